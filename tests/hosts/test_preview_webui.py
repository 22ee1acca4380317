"""The preview grid in the WebUI (issue 12 item 4) over the A1111 stand-ins: drawn by the
WebUI's own txt2img with ``<lora:…>`` tags once the new file is listed, on one seed,
nothing saved, ``params.txt`` as it was, the merge kept when the preview is stopped."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from loraclr_ext.preview.grid import LABEL_HEIGHT
from loraclr_ext.ui.service import ConceptRow, parse_options

FAST = {"steps": 1, "size": 64, "iterations": 0, "quality": False}
ROWS = [ConceptRow("sks_dog", "sks dog"), ConceptRow("zwx_cat", "zwx cat", 0.8)]


@pytest.fixture
def txt2img(webui, tmp_path):
    from modules import paths, processing

    processing.reset()
    data = tmp_path / "data"
    data.mkdir()
    paths.data_path = str(data)
    yield processing, data / "params.txt"
    paths.data_path = ""


def merge(webui, **extra):
    ctx = webui["ctx"]
    options = parse_options(ctx, {**FAST, "output": "duo", "preview": True, **extra})
    with ctx.job():
        return ctx.merge(ROWS, options), options


def test_preview_is_the_webuis_own_txt2img_of_the_new_file(webui, txt2img, monkeypatch):
    from loraclr_ext.ui import render

    processing, params = txt2img
    params.write_text("the user's last prompt")
    state, seen, counts, draw = webui["shared"].state, [], [], processing.process_images

    def watched(p):
        from modules.progress import progress_of

        seen.append((progress_of(state)[0], state.textinfo))
        counts.append((state.job_no, state.job_count))
        return draw(p)

    monkeypatch.setattr(processing, "process_images", watched)
    before = set(webui["dir"].rglob("*"))
    result, options = merge(webui)

    prompts = [c["prompt"] for c in processing.calls]
    assert prompts == [
        "sks dog <lora:duo:1>",
        "zwx cat <lora:duo:1>",
        "sks dog and zwx cat in a park <lora:duo:1>",
        "sks dog and zwx cat in a park <lora:sks_dog:1> <lora:zwx_cat:0.8>",
    ]
    assert processing.not_found == []  # the new file was listed before it was drawn
    assert processing.calls[3]["loras"] == [("sks_dog", 1.0), ("zwx_cat", 0.8)]
    for call in processing.calls:
        assert call["seed"] == options.seed and call["size"] == (64, 64)
        assert call["steps"] == 10 and call["sampler_name"] == "DPM++ 2M"  # CPU default
        assert call["cfg_scale"] == 7.0 and not call["saves"]
        assert call["always_on"] == 0  # an empty script runner: no ControlNet on a preview

    grid = result.preview
    assert grid is not None, result.preview_note
    assert grid.image.size == (4 * 64, 64 + LABEL_HEIGHT)
    assert len({image.tobytes() for image in grid.images}) == 4  # four different pictures
    assert params.read_text() == "the user's last prompt"  # the WebUI's last prompt kept
    assert set(webui["dir"].rglob("*")) - before == {
        webui["dir"] / "duo.safetensors",
        webui["dir"] / "duo.json",
    }  # no image saved anywhere in the Lora folder
    status = webui["ctx"].status()
    assert status["outcome"] == "wrote duo.safetensors" and status["stage"] == "done"
    # The preview is the last slice of the merge's one bar: the WebUI's progress formula
    # goes on from where the merge left it, one step per image, never back.
    assert [text for _, text in seen] == [f"LoRACLR: preview image {i} of 4" for i in range(1, 5)]
    # whole numbers: Forge's console bar multiplies them by the sampler's steps
    assert all(isinstance(v, int) for pair in counts for v in pair), counts
    bar = [value for value, _ in seen]
    start = bar[0]
    assert 0.5 < start < 0.7 and bar == pytest.approx(
        [start + (1 - start) * i / 4 for i in range(4)]
    )

    html = render.result_panel(result)
    encoded = re.search(r"src='data:image/png;base64,([^']+)'", html).group(1)
    assert base64.b64decode(encoded) == grid.png()
    assert Image.open(io.BytesIO(grid.png())).size == grid.image.size
    assert "&lt;lora:sks_dog:1&gt; &lt;lora:zwx_cat:0.8&gt;" in html
    assert "preview" in render.stage_times(result.seconds)


def test_params_txt_absent_before_is_absent_after(webui, txt2img):
    _, params = txt2img
    result, _ = merge(webui)
    assert result.preview is not None and not params.exists()


def test_interrupt_in_the_preview_keeps_the_merge(webui, txt2img, monkeypatch):
    processing, params = txt2img
    params.write_text("kept")
    draw = processing.process_images

    def then_interrupt(p):
        out = draw(p)
        webui["shared"].state.interrupt()  # the user presses Interrupt during image 1
        return out

    monkeypatch.setattr(processing, "process_images", then_interrupt)
    result, _ = merge(webui)
    assert len(processing.calls) == 1
    assert result.preview is None and result.preview_note.startswith("Preview stopped")
    assert (webui["dir"] / "duo.safetensors").is_file()
    assert params.read_text() == "kept"
    assert webui["ctx"].status()["outcome"] == "wrote duo.safetensors"


def test_a_broken_txt2img_is_a_note_not_a_failed_merge(webui, txt2img, monkeypatch):
    processing, params = txt2img
    params.write_text("kept")

    def broken(p):
        params.write_text(p.prompt)  # as far as the WebUI got
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(processing, "process_images", broken)
    result, _ = merge(webui)
    assert result.preview is None
    assert "RuntimeError: CUDA error" in result.preview_note
    assert params.read_text() == "kept"
    assert (webui["dir"] / "duo.safetensors").is_file()


def test_no_preview_unless_asked(webui, txt2img):
    processing, _ = txt2img
    result, _ = merge(webui, preview=False)
    assert processing.calls == [] and result.preview is None and result.preview_note == ""
