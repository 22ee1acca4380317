"""The tab in a real browser: Debian's chromium (headless) driven by Playwright.

A small gradio app (3.41.2 or 4.40.0, whichever venv runs the test) serves the tab (built
over the ``modules.*`` stand-ins, as in ``test_tab.py``) next to a stand-in txt2img tab on
127.0.0.1; the test ticks two LoRAs, edits a concept prompt, sets a tiny merge, clicks
Merge and checks the result panel, the report and the written file, then sends the prompt
tag to txt2img. A screenshot goes to ``test-artifacts/loraclr_tab_gradio<major>.png``.

Skipped where ``/usr/bin/chromium`` or the ``playwright`` package is missing (CI installs
both: ``.ci/run`` and ``.ci/setup-ui``). Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
from fixtures import gradio_major

ROOT = Path(__file__).resolve().parents[2]
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
MERGE_TIMEOUT_MS = 180_000  # the tiny merge with its report: ~15 s on 2 shared cores

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
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


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


def shot(page, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def test_tab_in_chromium_merges_and_shows_report(webui, served, page):
    page.goto(served)
    # The extension's javascript/ file, as a classic script (A1111 adds it to its page).
    page.add_script_tag(path=str(ROOT / "javascript" / "loraclr.js"))
    page.locator("#loraclr_list table.loraclr-list").wait_for()

    # Tick two LoRAs in the multiselect; the concept rows fill with their triggers.
    # Each row is awaited before the next tick, as a user sees it appear; the merge itself
    # follows the ticks even if a row lags (test_tab.py).
    rows = table_rows(page.locator("#loraclr_concepts"))
    for name, trigger in (("sks_dog", "sks dog"), ("zwx_cat", "zwx cat")):
        tick(page, "loraclr_select", name)
        rows.get_by_text(trigger).first.wait_for()
    assert rows.count() == 2

    # Edit the first concept prompt in the dataframe.
    cell = rows.first.locator("td").nth(1)
    cell.dblclick()
    editor = cell.locator("input")
    editor.fill("sks dog, brown fur")
    editor.press("Enter")
    rows.get_by_text("sks dog, brown fur").wait_for()

    # A tiny merge: 1 step at 64 px, no refinement iterations; quality report on.
    set_number(page, "steps", 1)
    set_number(page, "size", 64)
    page.get_by_text("Advanced", exact=True).click()
    set_number(page, "iterations", 0)
    quality = page.locator("#loraclr_opt_quality input[type=checkbox]")
    quality.check()

    page.locator("#loraclr_merge").click()
    result = page.locator("#loraclr_result .loraclr-result, #loraclr_result .loraclr-error").first
    try:
        result.wait_for(timeout=MERGE_TIMEOUT_MS)
    except Exception as exc:
        shot(page, ARTIFACTS / f"loraclr_tab_gradio{gradio_major()}_failed.png")
        raise AssertionError("no result; console:\n" + "\n".join(page.console_lines)) from exc
    shot(page, ARTIFACTS / f"loraclr_tab_gradio{gradio_major()}.png")
    text = result.inner_text()
    assert "<lora:merged:1>" in text, text
    assert "sks dog, brown fur" in text, text
    assert result.locator("table.loraclr-report").count() == 1
    assert result.locator(".loraclr-bar").count() > 0
    tag = page.locator("#loraclr_prompt_tag").locator("textarea, input").first
    assert tag.input_value().startswith("<lora:merged:1>, sks dog, brown fur")
    assert (webui["dir"] / "merged.safetensors").is_file()
    assert (webui["dir"] / "merged.json").is_file()

    # "Send to txt2img": the tag is appended to the txt2img prompt, gradio receives the
    # new value (echoed back by the server), and the txt2img tab is the one shown.
    page.locator("#loraclr_send_txt2img").click()
    sent = f"a photo, {tag.input_value()}"
    page.locator("#tab_txt2img").wait_for(state="visible")
    echo = page.locator("#txt2img_echo").locator("textarea, input").first
    expect_value(echo, sent)
    assert page.locator("#txt2img_prompt textarea").input_value() == sent
    assert page.locator("#tab_loraclr_merge").is_hidden()
    # No script error on the way (gradio 3 threw one when Send returned a value to an event
    # without outputs).
    errors = [line for line in page.console_lines if line.startswith("pageerror")]
    assert not errors, errors
