"""The tab in a real browser: Debian's chromium (headless) driven by Playwright.

A small gradio 3.41.2 app serves the tab (built over the ``modules.*`` stand-ins, as in
``test_tab.py``) on 127.0.0.1; the test ticks two LoRAs, edits a concept prompt, sets a
tiny merge, clicks Merge and checks the result panel, the report and the written file. A
screenshot goes to ``test-artifacts/loraclr_tab.png``.

Skipped where ``/usr/bin/chromium`` or the ``playwright`` package is missing (CI installs
both: ``.ci/run`` and ``.ci/setup-ui``). Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "test-artifacts" / "loraclr_tab.png"
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
    """The tab inside a gradio Blocks app (as A1111 renders it), queued like A1111, served
    on 127.0.0.1 by gradio's own uvicorn thread; closed at the end."""
    import gradio as gr

    from loraclr_ext.webui.ui import create_tab

    tab, _ = create_tab(webui["ctx"])
    with (
        gr.Blocks(analytics_enabled=False, title="LoRACLR Merge test") as app,
        gr.Tab("LoRACLR Merge", id="loraclr_merge_tab"),
    ):
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


def set_number(page, name: str, value: int) -> None:
    box = page.locator(f"#loraclr_opt_{name} input[type=number]")
    box.fill(str(value))
    box.blur()


def shot(page, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def test_tab_in_chromium_merges_and_shows_report(webui, served, page):
    page.goto(served)
    # The extension's javascript/ file, as a classic script (A1111 adds it to its page).
    page.add_script_tag(path=str(ROOT / "javascript" / "loraclr.js"))
    page.locator("#loraclr_list table.loraclr-list").wait_for()

    # Tick two LoRAs in the multiselect; the concept rows fill with their triggers.
    for name in ("sks_dog", "zwx_cat"):
        page.locator("#loraclr_select input").click()
        page.locator(f"#loraclr_select li[data-value='{name}']").click()
    concepts = page.locator("#loraclr_concepts")
    concepts.get_by_text("zwx cat").wait_for()

    # Edit the first concept prompt in the dataframe.
    cell = concepts.locator("tbody tr").first.locator("td").nth(1)
    cell.dblclick()
    editor = cell.locator("input")
    editor.fill("sks dog, brown fur")
    editor.press("Enter")
    concepts.get_by_text("sks dog, brown fur").wait_for()

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
        shot(page, SCREENSHOT.with_name("loraclr_tab_failed.png"))
        raise AssertionError("no result; console:\n" + "\n".join(page.console_lines)) from exc
    shot(page, SCREENSHOT)
    text = result.inner_text()
    assert "<lora:merged:1>" in text, text
    assert "sks dog, brown fur" in text, text
    assert result.locator("table.loraclr-report").count() == 1
    assert result.locator(".loraclr-bar").count() > 0
    tag = page.locator("#loraclr_prompt_tag textarea")
    assert tag.input_value().startswith("<lora:merged:1>, sks dog, brown fur")
    assert (webui["dir"] / "merged.safetensors").is_file()
    assert (webui["dir"] / "merged.json").is_file()
