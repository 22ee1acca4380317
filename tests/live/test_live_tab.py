"""The tab in a running WebUI, in a real headless browser: Debian's ``/usr/bin/chromium``
driven by Playwright (never a browser Playwright downloads).

Opt-in like the rest of ``tests/live`` (``LORACLR_LIVE_URL``; see conftest.py), and also
skipped unless the ``playwright`` package and ``/usr/bin/chromium`` exist. Run it with a
Python that has Playwright, e.g. ``.ci/ui-venv/bin/python -m pytest tests/live/test_live_tab.py``.

It opens the WebUI's page, goes to the "LoRACLR Merge" tab, ticks the two LoRAs, sets a
small merge (1 step at 64 px, no refinement, quality report on, overwrite), clicks Merge
and checks: the WebUI's progress bar shows inside the tab's own progress area, the result
panel names ``<lora:live_tab:1>`` with the report, the LoRA list shows the new file without
a restart, and the page raised no error. Screenshots go to ``test-artifacts/``
(git-ignored): ``live_<name>_start.png``, ``…_during.png`` (progress bar up),
``…_after.png`` (result panel and report) and ``…_preview.png`` (the preview grid,
ticked); ``<name>`` is ``LORACLR_LIVE_NAME`` or the port.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

URL = os.environ.get("LORACLR_LIVE_URL", "").rstrip("/")
NAME = os.environ.get("LORACLR_LIVE_NAME") or f"port{urlparse(URL).port or 80}"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
OUTPUT = "live_tab"
MERGE_TIMEOUT_MS = 1_800_000  # a small real SD 1.5 merge with its report on 2 busy cores
PAGE_TIMEOUT_MS = 300_000  # the WebUI's page is heavy; its first load takes a while

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (apt chromium)"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="the playwright package is missing"
    ),
]


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
            viewport={"width": 1400, "height": 1000},
        )
        try:
            # Offline machine: fonts and anything else not served by the WebUI are refused.
            host = f"{urlparse(URL).scheme}://{urlparse(URL).netloc}"
            context.route(lambda url: not url.startswith(host), lambda route: route.abort())
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            yield page
        finally:
            context.close()


def shot(page, stage: str) -> Path:
    path = ARTIFACTS / f"live_{NAME}_{stage}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def tick(page, option: str) -> None:
    """Pick ``option`` in the multiselect (list items carry it as ``aria-label`` in gradio
    3.41 and 4.40 alike)."""
    page.locator("#loraclr_select input").click()
    page.locator(f"#loraclr_select li[aria-label='{option}']").click()
    # The concept table gains the LoRA's row before the next pick (as a user sees it).
    page.locator("#loraclr_concepts").get_by_text(option).first.wait_for()


def set_number(page, name: str, value: int) -> None:
    field = page.locator(f"#loraclr_opt_{name} input[type=number]")
    field.fill(str(value))
    field.blur()


def inside(inner: dict, outer: dict, slack: float = 0.5) -> bool:
    return (
        inner["x"] >= outer["x"] - slack
        and inner["y"] >= outer["y"] - slack
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + slack
    )


def test_tab_merges_in_a_real_browser(page, concepts):
    page.goto(URL + "/", timeout=PAGE_TIMEOUT_MS)
    page.locator("#tabs .tab-nav button", has_text="LoRACLR Merge").first.click(
        timeout=PAGE_TIMEOUT_MS
    )
    page.locator("#loraclr_list table.loraclr-list").first.wait_for()
    shot(page, "start")

    for concept in concepts:
        tick(page, concept["name"])
    output = page.locator("#loraclr_opt_output").locator("textarea, input").first
    output.fill(OUTPUT)
    output.blur()
    set_number(page, "steps", 1)
    set_number(page, "size", 64)
    page.get_by_text("Advanced", exact=True).click()
    set_number(page, "iterations", 0)
    page.locator("#loraclr_opt_quality input[type=checkbox]").check()
    page.locator("#loraclr_opt_overwrite input[type=checkbox]").check()
    page.locator("#loraclr_opt_preview input[type=checkbox]").check()

    page.locator("#loraclr_merge").click()
    bar = page.locator(".progressDiv").first
    bar.wait_for(timeout=120_000)
    page.wait_for_timeout(3_000)  # let the bar show a stage
    shot(page, "during")
    area = page.locator("#loraclr_progress").first.bounding_box()
    assert area is not None and inside(bar.bounding_box(), area), "bar outside its area"

    result = page.locator("#loraclr_result .loraclr-result, #loraclr_result .loraclr-error")
    result.first.wait_for(timeout=MERGE_TIMEOUT_MS)
    page.locator(".progressDiv").first.wait_for(state="detached", timeout=60_000)
    shot(page, "after")
    text = result.first.inner_text()
    assert f"<lora:{OUTPUT}:1>" in text, text
    assert page.locator("#loraclr_result table.loraclr-report").count() == 1
    assert f"{OUTPUT}.safetensors" in page.locator("#loraclr_list").first.inner_text()
    # The preview grid: the WebUI's own images, whole, inside the result panel.
    figure = page.locator("#loraclr_result figure.loraclr-preview").first
    figure.wait_for()
    image = figure.locator("img")
    natural = image.evaluate("e => [e.complete, e.naturalWidth, e.naturalHeight]")
    assert natural[0] and natural[1] == 64 * (len(concepts) + 2), natural
    assert inside(image.bounding_box(), result.first.bounding_box())
    figure.screenshot(path=str(ARTIFACTS / f"live_{NAME}_preview.png"))
    assert not page.errors, page.errors
