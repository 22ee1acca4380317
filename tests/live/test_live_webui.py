"""The sequences users meet, driven against a running WebUI (see conftest.py for the set-up).

Run in file order, right after the WebUI started: the first merge meets a checkpoint that is
still loading (A1111) or not loaded yet (Forge, before any generation).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from webui_api import WebUI, decode

PLAIN = "a photo of a house"
LORA_DIR = os.environ.get("LORACLR_LIVE_LORA_DIR")
LOG = os.environ.get("LORACLR_LIVE_LOG")
STAGES = ("Recording", "Solving", "Measuring quality")


def _differing(a: tuple, b: tuple) -> str:
    """How two decoded images differ, for the failure message."""
    if a[:2] != b[:2]:
        return f"mode/size {a[:2]} vs {b[:2]}"
    diff = [abs(x - y) for x, y in zip(a[2], b[2], strict=True) if x != y]
    return f"{len(diff)} of {len(a[2])} bytes differ, by up to {max(diff, default=0)}"


def _lora_files() -> set[str]:
    assert LORA_DIR
    return {p.name for p in Path(LORA_DIR).rglob("*") if p.is_file()}


def test_first_merge_right_after_start(webui: WebUI, concepts: list[dict]) -> None:
    """A1111 serves its API before the checkpoint has loaded; Forge loads it on first use.
    The merge waits for the model like txt2img does instead of answering 'no checkpoint'."""
    reply = webui.merge(concepts, "live_first", overwrite=True)
    assert reply.status == 200, reply.body
    assert reply.body["file"].endswith("live_first.safetensors")


def test_generate_merge_generate_is_byte_identical(webui: WebUI, concepts: list[dict]) -> None:
    """A merge never changes what the WebUI generates: the same seeded image, with a LoRA
    the WebUI merged into its weights by the generation before, is byte-identical after."""
    prompt = f"{concepts[0]['prompt']} <lora:{concepts[0]['name']}:1>"
    before_lora, before_plain = webui.generate(prompt), webui.generate(PLAIN)
    reply = webui.merge(concepts, "live_between", overwrite=True)
    assert reply.status == 200, reply.body
    after_lora, after_plain = decode(webui.generate(prompt)), decode(webui.generate(PLAIN))
    assert after_lora == decode(before_lora), _differing(after_lora, decode(before_lora))
    assert after_plain == decode(before_plain), _differing(after_plain, decode(before_plain))


@pytest.mark.parametrize("stage", STAGES)
def test_interrupt_in_each_stage_leaves_nothing(webui: WebUI, concepts: list[dict], stage) -> None:
    """Interrupt (the WebUI's own button, /sdapi/v1/interrupt) while a stage runs: HTTP 409,
    no file, and the next image is byte-identical to one made before."""
    reference = webui.generate(PLAIN)
    output = f"live_interrupt_{stage.split()[0].lower()}"
    before = _lora_files() if LORA_DIR else None
    thread, holder = webui.merge_in_background(concepts, output, overwrite=True, quality=True)
    seen = ""
    deadline = time.monotonic() + 1200
    while thread.is_alive() and time.monotonic() < deadline:
        seen = webui.progress_text()
        if stage.lower() in seen.lower():
            webui.call("POST", "/sdapi/v1/interrupt")
            break
        time.sleep(0.2)
    thread.join(1200)
    reply = holder["reply"]
    if stage.lower() not in seen.lower():
        pytest.skip(f"the merge finished before the {stage!r} stage was seen ({reply.status})")
    assert reply.status == 409 and "interrupted" in str(reply.body).lower(), reply.body
    if before is not None:
        assert _lora_files() == before
    assert decode(webui.generate(PLAIN)) == decode(reference)


@pytest.mark.skipif(not LORA_DIR, reason="needs LORACLR_LIVE_LORA_DIR")
def test_corrupt_lora_is_refused_in_one_line(webui: WebUI, concepts: list[dict]) -> None:
    reference = webui.generate(PLAIN)
    broken = Path(LORA_DIR) / "live_corrupt.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    try:
        webui.call("POST", "/sdapi/v1/refresh-loras")
        before = _lora_files()
        rows = [concepts[0], {"name": "live_corrupt", "prompt": "qpr castle"}]
        started = time.monotonic()
        reply = webui.merge(rows, "live_corrupt_merge", overwrite=True)
        assert reply.status == 400, reply.body
        message = reply.body["detail"] if isinstance(reply.body, dict) else str(reply.body)
        assert "live_corrupt" in message and "\n" not in message
        assert time.monotonic() - started < 30  # refused before any model work
        assert _lora_files() == before
        assert decode(webui.generate(PLAIN)) == decode(reference)
    finally:
        broken.unlink()


def test_two_merges_under_one_name_with_overwrite(webui: WebUI, concepts: list[dict]) -> None:
    """The second merge replaces the first and the next generation uses the new file."""
    first = webui.merge(concepts, "live_same", overwrite=True)
    assert first.status == 200, first.body
    tag = f"{PLAIN} <lora:live_same:1>"
    image_first = webui.generate(tag)
    weaker = [{**c, "strength": 0.5} for c in concepts]
    second = webui.merge(weaker, "live_same", overwrite=True)
    assert second.status == 200, second.body
    image_second = webui.generate(tag)
    for image in (image_first, image_second):
        # Forge once drew both all black (NaN in its decode, a random checkpoint at this
        # LoRA weight): equal blank images would say nothing about which file was used
        assert len(set(decode(image)[2])) > 1, "a one-colour image: nothing to compare"
    assert decode(image_second) != decode(image_first)
    refused = webui.merge(concepts, "live_same", overwrite=False)
    assert refused.status == 409 and "exists" in str(refused.body)


@pytest.mark.skipif(not LOG, reason="needs LORACLR_LIVE_LOG")
def test_merged_lora_loads_with_no_unmatched_keys(webui: WebUI, concepts: list[dict]) -> None:
    reply = webui.merge(concepts, "live_keys", overwrite=True)
    assert reply.status == 200, reply.body
    assert LOG
    start = Path(LOG).stat().st_size
    webui.generate(f"{PLAIN} <lora:live_keys:1>")
    text = Path(LOG).read_bytes()[start:].decode(errors="replace")
    assert "didn't match keys" not in text  # A1111 (--loglevel DEBUG)
    assert not re.search(r"unmatched keys|skipped [1-9]\d* keys", text)  # Forge
    assert "lora key not loaded" not in text  # reForge (ldm_patched/modules/lora.py)
    forge_lines = re.findall(r"Loaded .*live_keys.* with (\d+) keys", text)
    assert all(int(n) > 0 for n in forge_lines)


def test_preview_is_drawn_and_leaves_generation_unchanged(
    webui: WebUI, concepts: list[dict]
) -> None:
    """The preview grid comes from the WebUI's own txt2img (one image per cell, the new
    file found by name) and leaves the WebUI as it was: the same seeded images after it,
    nothing new in the outputs folder."""
    import base64
    import io

    from PIL import Image

    prompt = f"{concepts[0]['prompt']} <lora:{concepts[0]['name']}:1>"
    before_lora, before_plain = webui.generate(prompt), webui.generate(PLAIN)
    start = Path(LOG).stat().st_size if LOG else 0
    reply = webui.merge(concepts, "live_preview", overwrite=True, preview=True)
    assert reply.status == 200, reply.body
    preview = reply.body["preview"]
    assert preview and preview["png_base64"], preview
    grid = Image.open(io.BytesIO(base64.b64decode(preview["png_base64"])))
    cells = preview["cells"]
    assert len(cells) == len(concepts) + 2 and grid.width == 64 * len(cells), preview["summary"]
    assert all("<lora:live_preview:1>" in c["prompt"] for c in cells[:-1])
    assert all(f"<lora:{c['name']}:" in cells[-1]["prompt"] for c in concepts)
    if LOG:  # every tag found: A1111 logs "Networks not found", Forge "not found"
        text = Path(LOG).read_bytes()[start:].decode(errors="replace")
        assert "not found" not in text.lower(), text[-2000:]
    after_lora, after_plain = decode(webui.generate(prompt)), decode(webui.generate(PLAIN))
    assert after_lora == decode(before_lora), _differing(after_lora, decode(before_lora))
    assert after_plain == decode(before_plain), _differing(after_plain, decode(before_plain))
