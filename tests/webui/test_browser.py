"""The tab in a real browser: Debian's chromium (headless) driven by Playwright.

A small gradio app (3.41.2 or 4.40.0, whichever venv runs the test) serves the tab (built
over the ``modules.*`` stand-ins, as in ``test_tab.py``) next to a stand-in txt2img tab on
127.0.0.1; the test ticks two LoRAs, edits a concept prompt, sets a tiny merge, clicks
Merge and checks the result panel, the report and the written file, then sends the prompt
tag to txt2img. The page also carries stand-ins of the WebUI's progress bar
(``tests/fakes/webui_page``: its script, its CSS, and ``/internal/progress`` answered from
``shared.state`` the WebUI's way), the extension's ``style.css`` and ``javascript/`` file.
Any page error fails the test. Screenshots go to ``test-artifacts/``:
``loraclr_tab_gradio<major>_start.png`` (nothing ticked), ``…_during.png`` (progress bar
up), ``loraclr_tab_gradio<major>.png`` (result and report).

Skipped where ``/usr/bin/chromium`` or the ``playwright`` package is missing (CI installs
both: ``.ci/run`` and ``.ci/setup-ui``). Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import time
from pathlib import Path

import pytest
from fixtures import gradio_major

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "tests" / "fakes" / "webui_page"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MERGE_TIMEOUT_MS = (
    600_000  # the tiny merge with its report: ~15 s alone on 2 cores, minutes when shared
)

BROWSER = pytest.mark.browser

pytestmark = [
    BROWSER,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (apt chromium)"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the playwright package is missing (.ci/setup-ui installs it)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The merge must outlast several polls of the progress bar (every 500 ms) on any machine:
# a fast CI machine finished the unpaced tiny merge in 1.5 s, between two polls.
UNET_CALL_PAUSE_S = 0.4


@pytest.fixture
def paced(webui):
    """Each UNet call of the fake model waits ``UNET_CALL_PAUSE_S``, so the tiny merge takes
    seconds however fast the machine is; the hook is removed afterwards."""
    unet = webui["model"].model.diffusion_model
    calls = {"n": 0}

    def pause(module, args):
        calls["n"] += 1
        time.sleep(UNET_CALL_PAUSE_S)

    handle = unet.register_forward_pre_hook(pause)
    yield calls
    handle.remove()


@pytest.fixture
def served(webui):
    """The tab inside a gradio Blocks app as the WebUIs render it (a ``TabItem`` with
    ``elem_id="tab_<id>"`` in ``#tabs``), after a stand-in txt2img tab whose prompt box
    echoes every value gradio receives into ``#txt2img_echo``; queued like the WebUI,
    served on 127.0.0.1 by gradio's own uvicorn thread; closed at the end."""
    import gradio as gr

    from loraclr_ext.ui.tab import create_tab

    tab, _ = create_tab(webui["ctx"])
    with (
        gr.Blocks(analytics_enabled=False, title="LoRACLR Merge test") as app,
        gr.Tabs(elem_id="tabs", selected="loraclr_merge"),
    ):
        with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
            prompt = gr.Textbox("a photo", lines=2, elem_id="txt2img_prompt")
            echo = gr.Textbox(elem_id="txt2img_echo")
            prompt.change(lambda text: text, inputs=[prompt], outputs=[echo])
        with gr.Tab("LoRACLR Merge", id="loraclr_merge", elem_id="tab_loraclr_merge"):
            tab.render()
    app.queue()
    port = free_port()
    app.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_api=False,
        inbrowser=False,
    )
    add_progress_route(app.server_app)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def add_progress_route(fastapi_app) -> None:
    """``POST /internal/progress`` as the WebUI serves it, ahead of gradio's own routes."""
    from fastapi import Body
    from modules import progress

    def internal_progress(body: dict = Body(...)) -> dict:  # noqa: B008
        return progress.answer(str(body.get("id_task", "")))

    fastapi_app.add_api_route("/internal/progress", internal_progress, methods=["POST"])
    routes = fastapi_app.router.routes
    routes.insert(0, routes.pop())


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            # Offline: the theme's Google fonts and anything else off 127.0.0.1 are refused.
            context.route(
                lambda url: not url.startswith("http://127.0.0.1:"), lambda route: route.abort()
            )
            page = context.pages[0] if context.pages else context.new_page()
            page.console_lines = []
            page.on("console", lambda m: page.console_lines.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: page.console_lines.append(f"pageerror: {e}"))
            yield page
        finally:
            context.close()


def tick(page, elem_id: str, option: str) -> None:
    """Pick ``option`` in a multiselect dropdown: its list items carry the choice as
    ``aria-label`` in gradio 3.41 and 4.40 alike."""
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id} li[aria-label='{option}']").click()


def table_rows(frame):
    """The dataframe's body rows. Gradio 4 renders a hidden sizing copy of the table
    before the virtual one that shows and edits the rows."""
    if gradio_major() >= 4:
        return frame.locator("svelte-virtual-table-viewport tbody tr")
    return frame.locator("tbody tr")


def set_number(page, name: str, value: int) -> None:
    box = page.locator(f"#loraclr_opt_{name} input[type=number]")
    box.fill(str(value))
    box.blur()


def expect_value(field, value: str, timeout_ms: int = 10_000) -> None:
    from playwright.sync_api import expect

    expect(field).to_have_value(value, timeout=timeout_ms)


def shot(page, name: str, full_page: bool = True) -> None:
    """A screenshot into test-artifacts/ (the whole page unless ``full_page`` is off)."""
    path = ARTIFACTS / f"loraclr_tab_gradio{gradio_major()}{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)


def open_tab(page, url: str) -> None:
    """The page as a WebUI serves it: its progress-bar script and CSS, then the
    extension's ``style.css`` and ``javascript/`` file (A1111, Forge and reForge add both)."""
    page.goto(url)
    page.add_style_tag(path=str(PAGE / "progressbar.css"))
    page.add_script_tag(path=str(PAGE / "progressbar.js"))
    page.add_style_tag(path=str(ROOT / "style.css"))
    page.add_script_tag(path=str(ROOT / "javascript" / "loraclr.js"))
    try:
        page.locator("#loraclr_list table.loraclr-list").first.wait_for()
    except Exception as exc:
        raise AssertionError("the tab did not render:\n" + "\n".join(page.console_lines)) from exc


def box(locator) -> dict:
    found = locator.bounding_box()
    assert found is not None, f"{locator} is not rendered"
    return found


def overlap(a: dict, b: dict) -> bool:
    """Whether two bounding boxes share any area (touching edges do not count)."""
    return (
        a["x"] < b["x"] + b["width"] - 0.5
        and b["x"] < a["x"] + a["width"] - 0.5
        and a["y"] < b["y"] + b["height"] - 0.5
        and b["y"] < a["y"] + a["height"] - 0.5
    )


def inside(inner: dict, outer: dict, slack: float = 0.5) -> bool:
    return (
        inner["x"] >= outer["x"] - slack
        and inner["y"] >= outer["y"] - slack
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + slack
    )


def page_errors(page) -> list[str]:
    return [line for line in page.console_lines if line.startswith("pageerror")]


def check_progress_bar_has_its_own_place(page) -> None:
    """The WebUI's bar sits inside #loraclr_progress and covers none of the column's
    other blocks (the "Output" field, the buttons, the result)."""
    bar = page.locator(".progressDiv").first
    bar.wait_for(timeout=30_000)
    # gradio 3 puts an HTML component's elem_id on its block and on the inner div too
    area = box(page.locator("#loraclr_progress").first)
    assert inside(box(bar), area), (box(bar), area)
    column = page.locator("#loraclr_progress").first.locator("xpath=..")
    others = column.locator(":scope > *:not(#loraclr_progress)")
    for i in range(others.count()):
        other = others.nth(i)
        if other.is_visible():
            assert not overlap(box(bar), box(other)), other.evaluate("e => e.outerHTML")[:200]
    output = page.locator("#loraclr_opt_output")
    assert not overlap(box(bar), box(output))


def test_tab_in_chromium_merges_and_shows_report(webui, paced, served, page):
    open_tab(page, served)
    count = page.locator("#loraclr_list .loraclr-count")
    assert count.inner_text() == "5 of 5 LoRAs shown."

    # Before anything is ticked: a hint, no concept row (gradio 4 drew a blank row with
    # strength 0), and "Send to txt2img" disabled (there is no tag to send).
    send = page.locator("#loraclr_send_txt2img")
    assert page.locator("#loraclr_concepts_hint").first.is_visible()
    rows = table_rows(page.locator("#loraclr_concepts"))
    assert not any(rows.nth(i).is_visible() for i in range(rows.count()))
    assert send.is_disabled()
    shot(page, "_start", full_page=False)

    # Tick two LoRAs in the multiselect; the concept rows fill with their triggers.
    # Each row is awaited before the next tick, as a user sees it appear; the merge itself
    # follows the ticks even if a row lags (test_tab.py).
    for name, trigger in (("sks_dog", "sks dog"), ("zwx_cat", "zwx cat")):
        tick(page, "loraclr_select", name)
        rows.get_by_text(trigger).first.wait_for()
    assert rows.count() == 2
    assert not page.locator("#loraclr_concepts_hint").first.is_visible()

    # Edit the first concept prompt in the dataframe.
    # In the middle of the viewport first: gradio 4.40 scrolls a cell selected at the
    # viewport's bottom edge into view between the two clicks, and the second then lands
    # on the next row.
    cell = rows.first.locator("td").nth(1)
    cell.evaluate("e => e.scrollIntoView({block: 'center'})")
    cell.dblclick()
    editor = cell.locator("input")
    editor.fill("sks dog, brown fur")
    editor.press("Enter")
    rows.get_by_text("sks dog, brown fur").wait_for()

    # Rank: "0 = exact" in the label and the help, and 0 in the field.
    rank = page.locator("#loraclr_opt_rank")
    assert "0 = exact" in rank.inner_text() and "empty" not in rank.inner_text()
    assert rank.locator("input[type=number]").input_value() == "0"

    # A tiny merge: 1 step at 64 px, no refinement iterations; quality report on.
    set_number(page, "steps", 1)
    set_number(page, "size", 64)
    page.get_by_text("Advanced", exact=True).click()
    set_number(page, "iterations", 0)
    quality = page.locator("#loraclr_opt_quality input[type=checkbox]")
    quality.check()
    page.locator("#loraclr_opt_preview input[type=checkbox]").check()

    started = time.monotonic()
    page.locator("#loraclr_merge").click()
    check_progress_bar_has_its_own_place(page)
    shot(page, "_during")
    result = page.locator("#loraclr_result .loraclr-result, #loraclr_result .loraclr-error").first
    try:
        result.wait_for(timeout=MERGE_TIMEOUT_MS)
    except Exception as exc:
        shot(page, "_failed")
        raise AssertionError("no result; console:\n" + "\n".join(page.console_lines)) from exc
    took = time.monotonic() - started
    assert not page_errors(page), page.console_lines
    # The pauses alone outlast four polls, whatever the machine's speed.
    assert paced["n"] * UNET_CALL_PAUSE_S >= 2.0, paced

    # The list shows the new file without a restart; the bar is gone.
    expect_text(count, "6 of 6 LoRAs shown.")
    assert "merged.safetensors" in page.locator("#loraclr_list").first.inner_text()
    # The same two LoRAs still show ticked once "merged" joined the choices.
    expect_ticked(page, ["sks_dog", "zwx_cat"])
    check_fits_or_scrolls(page.locator("#loraclr_list .loraclr-scroll").first)
    page.locator(".progressDiv").wait_for(state="detached", timeout=10_000)
    shot(page, "")
    check_progress_log(page, took)

    text = result.inner_text()
    assert "<lora:merged:1>" in text, text
    assert "sks dog, brown fur" in text, text
    # Stage times in words, not a dict.
    times = result.locator(".loraclr-times").inner_text()
    pattern = r"took .+: recording [\d.]+ s · solving [\d.]+ s · quality report"
    assert re.search(pattern, times), times
    assert "seconds:" not in text and "collect" not in text
    check_report_fits(result)
    check_preview(result)
    tag = page.locator("#loraclr_prompt_tag").locator("textarea, input").first
    assert tag.input_value().startswith("<lora:merged:1>, sks dog, brown fur")
    assert (webui["dir"] / "merged.safetensors").is_file()
    assert (webui["dir"] / "merged.json").is_file()

    # "Send to txt2img", now enabled: the tag is appended to the txt2img prompt, gradio
    # receives the new value (echoed back by the server), and the txt2img tab is shown.
    expect_enabled(send)
    send.click()
    sent = f"a photo, {tag.input_value()}"
    page.locator("#tab_txt2img").wait_for(state="visible")
    echo = page.locator("#txt2img_echo").locator("textarea, input").first
    expect_value(echo, sent)
    assert page.locator("#txt2img_prompt textarea").input_value() == sent
    assert page.locator("#tab_loraclr_merge").is_hidden()
    # No script error on the way (gradio 3 threw one when Send returned a value to an event
    # without outputs).
    assert not page_errors(page), page_errors(page)


def check_preview(result) -> None:
    """The preview grid is drawn whole (four 64 px images and their labels) and scaled to
    the result column, with each image's prompt listed under it."""
    image = result.locator("figure.loraclr-preview img")
    image.wait_for()
    natural = image.evaluate("e => [e.complete, e.naturalWidth, e.naturalHeight]")
    assert natural[0] and natural[1:] == [4 * 64, 64 + 14], natural
    assert inside(box(image), box(result))
    caption = result.locator("figure.loraclr-preview figcaption").inner_text()
    assert "<lora:sks_dog:1> <lora:zwx_cat:1>" in caption and "4 images" in caption, caption


def check_progress_log(page, took: float) -> None:
    """What the progress API answered while the merge ran: one bar that never goes back,
    and an ETA in proportion to the merge (a stage restarting at ~1 % made it days)."""
    log = page.evaluate("window.loraclrProgressLog")
    active = [r for r in log if r["active"] and r["progress"] is not None]
    assert len(active) >= 3, log
    values = [r["progress"] for r in active]
    assert values == sorted(values), values
    assert all(r["textinfo"].startswith("LoRACLR: ") for r in active), active
    etas = [r["eta"] for r in active if r["progress"] >= 0.05 and r["eta"] is not None]
    assert etas and max(etas) < 10 * took + 30, (etas, took)


def check_fits_or_scrolls(scroller) -> bool:
    """A table's container either holds it whole or scrolls it (nothing is cut off);
    returns whether it fits."""
    fits = scroller.evaluate("e => e.scrollWidth <= e.clientWidth + 1")
    scrolls = scroller.evaluate("e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)")
    assert fits or scrolls
    return fits


def check_report_fits(result) -> None:
    """The report table is not clipped: it fits its column or scrolls inside it; every bar
    stays inside its cell; method names stay on one line."""
    table = result.locator("table.loraclr-report")
    scroller = result.locator(".loraclr-scroll:has(table.loraclr-report)")
    fits = check_fits_or_scrolls(scroller)
    panel = box(result.locator("xpath=ancestor::*[@id='loraclr_result']").first)
    assert box(scroller)["x"] + box(scroller)["width"] <= panel["x"] + panel["width"] + 1
    if not fits:  # what scrolls must be reachable: the last column is in the scroll range
        assert scroller.evaluate("e => e.scrollWidth - e.clientWidth") > 0
    headers = table.locator("thead th")
    assert headers.last.inner_text() == "base moved"
    cells = table.locator("td")
    for i in range(cells.count()):
        cell = cells.nth(i)
        assert inside(box(cell.locator(".loraclr-bar")), box(cell)), i
    names = table.locator("tbody th")
    assert "least squares" in names.all_inner_texts()
    lines = names.evaluate_all(
        "cells => cells.map(c => { const r = document.createRange(); r.selectNodeContents(c);"
        " return new Set([...r.getClientRects()].map(q => Math.round(q.top))).size; })"
    )
    assert set(lines) == {1}, lines
    # The per-concept plot: three panels (UNet, joint K/V, joint bleed), each drawn inside
    # the result panel with a bar per method and concept (two methods' worth at least).
    charts = result.locator("svg.loraclr-chart")
    assert charts.count() == 3
    for i in range(charts.count()):
        chart = box(charts.nth(i))
        assert chart["width"] > 100 and inside(chart, panel), (i, chart, panel)
        assert charts.nth(i).locator("rect").count() >= 2 * 4  # 2 concepts × 4 methods
    assert result.locator("dl.loraclr-help dt").count() == len(headers.all_inner_texts()) - 1


def expect_text(locator, text: str, timeout_ms: int = 30_000) -> None:
    from playwright.sync_api import expect

    expect(locator).to_have_text(text, timeout=timeout_ms)


def expect_ticked(page, names: list[str]) -> None:
    """The multiselect shows exactly ``names`` as its tokens (gradio 3.41 and 4.40 both
    draw a token with the name as text and a remove control)."""
    from playwright.sync_api import expect

    select = page.locator("#loraclr_select").first
    for name in names:
        expect(select.get_by_text(name, exact=True)).to_have_count(1)
    text = select.inner_text()
    assert "qpr_castle" not in text and "merged" not in text, text


def expect_enabled(locator, timeout_ms: int = 10_000) -> None:
    from playwright.sync_api import expect

    expect(locator).to_be_enabled(timeout=timeout_ms)


def text_lines(cell) -> int:
    """How many lines a cell's text takes (distinct line boxes of its contents)."""
    return cell.evaluate(
        """e => { const r = document.createRange(); r.selectNodeContents(e);
        return new Set([...r.getClientRects()].filter(b => b.width > 0)
            .map(b => Math.round(b.top))).size; }"""
    )


@pytest.mark.parametrize("width", [1400, 900])
def test_lora_list_usable_column_stays_on_one_line(webui, served, page, width):
    """In the real WebUIs the list's "usable" column wrapped: it held the reason of an
    unusable LoRA (a sentence with the file's path), so it was tall, squeezed and cut off
    at the column's edge. The header and every mark keep one line; each reason shows whole,
    in its own row across the table (which fits its column or scrolls)."""
    page.set_viewport_size({"width": width, "height": 1000})
    open_tab(page, served)
    shot(page, f"_list_{width}", full_page=False)
    table = page.locator("#loraclr_list table.loraclr-list").first
    marks = table.locator("tr:not(.loraclr-reason) > :last-child")
    seen = [
        (marks.nth(i).inner_text().strip(), text_lines(marks.nth(i))) for i in range(marks.count())
    ]
    assert {text for text, _ in seen} == {"usable", "✔", "✖"}, seen
    assert all(lines == 1 for _, lines in seen), seen
    scroller = page.locator("#loraclr_list .loraclr-scroll").first
    reasons = table.locator("tr.loraclr-reason td")
    assert reasons.count() == 2
    for i in range(reasons.count()):
        assert "safetensors" in reasons.nth(i).inner_text()
        reason = reasons.nth(i)
        assert inside(box(reason), box(table)) and box(reason)["width"] > box(table)["width"] / 2
        assert reason.evaluate("e => e.scrollWidth <= e.clientWidth + 1")  # not clipped
    check_fits_or_scrolls(scroller)


def test_page_load_lists_files_added_since_start(webui, served, page):
    """The tab is built once at WebUI start-up; a real Forge's freshly opened page still
    said "4 of 4 LoRAs shown" with 7 files in the folder (merged over the REST API since).
    Opening the page lists what the folder holds now, and offers it for ticking."""
    import shutil

    shutil.copy(webui["dir"] / "sks_dog.safetensors", webui["dir"] / "late_dog.safetensors")
    open_tab(page, served)
    expect_text(page.locator("#loraclr_list .loraclr-count"), "6 of 6 LoRAs shown.")
    tick(page, "loraclr_select", "late_dog")
    assert not page_errors(page), page.console_lines
