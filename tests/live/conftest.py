"""Live checks against a running WebUI (AUTOMATIC1111, Forge or reForge) over its REST API.

Opt-in, never run by CI: the tests are skipped unless ``LORACLR_LIVE_URL`` names a WebUI
started with ``--api`` and this extension installed. Environment:

* ``LORACLR_LIVE_URL``: e.g. ``http://127.0.0.1:7860``.
* ``LORACLR_LIVE_LORA_DIR``: the WebUI's Lora folder (for the corrupt-file and no-leftover
  checks; those tests skip without it).
* ``LORACLR_LIVE_LOG``: the WebUI's log file (A1111 at ``--loglevel DEBUG``; for the
  unmatched-keys check; skipped without it).
* ``LORACLR_LIVE_LORAS``: two LoRA names to merge, comma-separated (default: the first two
  usable ones the extension lists).

Run it right after starting the WebUI, so the first test meets the checkpoint still loading
(A1111) or not yet loaded (Forge): ``pytest tests/live -p no:cacheprovider -v``.
``test_live_tab.py`` drives the tab in headless ``/usr/bin/chromium`` and needs a Python with
the ``playwright`` package (skipped otherwise); ``LORACLR_LIVE_NAME`` names its screenshots.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from webui_api import WebUI

URL = os.environ.get("LORACLR_LIVE_URL", "").rstrip("/")


def pytest_collection_modifyitems(config, items):
    if URL:
        return
    skip = pytest.mark.skip(reason="set LORACLR_LIVE_URL to run the live WebUI checks")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def webui() -> WebUI:
    api = WebUI(URL)
    api.wait_until_up()
    return api


@pytest.fixture(scope="session")
def concepts(webui: WebUI) -> list[dict]:
    """Two LoRAs to merge with their prompts (from ``LORACLR_LIVE_LORAS`` or the list)."""
    listing = webui.call("GET", "/loraclr/v1/loras").body["loras"]
    wanted = [n for n in os.environ.get("LORACLR_LIVE_LORAS", "").split(",") if n]
    # The check's own outputs (live_*) are LoRAs too; never merge those again.
    usable = [
        e
        for e in listing
        if (e["usable"] or e.get("architecture") is None) and not e["name"].startswith("live_")
    ]
    chosen = [e for e in usable if e["name"] in wanted] if wanted else usable[:2]
    assert len(chosen) >= 2, f"need two usable LoRAs, the extension lists {listing}"
    return [
        {"name": e["name"], "prompt": (", ".join(e["triggers"][:2]) or e["name"])}
        for e in chosen[:2]
    ]
