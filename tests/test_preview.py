"""The preview grid (issue 12 item 4): its cells, its layout, Interrupt and failures, the
standalone renderer on a tiny real diffusers pipeline, and the command line's PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraclr_ext.engine import MergeResult, add_preview, run_merge
from loraclr_ext.errors import MergeInterruptedError
from loraclr_ext.hosts.weights import weights_fingerprint
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
from loraclr_ext.pipeline.plan import plan_merge
from loraclr_ext.preview.cells import LoraUse, PreviewCell, joint_prompt, preview_cells
from loraclr_ext.preview.grid import LABEL_HEIGHT, compose, render_grid
from loraclr_ext.preview.standalone import StandaloneRenderer, latent_image

FAST = {"steps": 1, "size": 64, "iterations": 0, "quality": False}
SPECS = [
    ConceptSpec(Path("/l/ohwx.safetensors"), "ohwx woman", 1.0),
    ConceptSpec(Path("/l/sub/zwx.safetensors"), "zwx man", 0.8),
]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


class Flat:
    """A renderer that paints each cell one colour and records its calls."""

    sampler = "flat"

    def __init__(self, stop_after: int | None = None, progress=None, fail: bool = False):
        self.calls: list[tuple[str, int, int, int]] = []
        self.stop_after, self.progress, self.fail = stop_after, progress, fail

    def render(self, cell, *, seed, steps, size, cfg):
        if self.fail:
            raise RuntimeError("sampler exploded")
        self.calls.append((cell.prompt_with_tags(), seed, steps, size))
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            self.progress.stop = True
        shade = 40 * len(self.calls)
        return Image.new("RGB", (size, size), (shade, 255 - shade, 0))


class Stoppable:
    def __init__(self):
        self.stop, self.stages, self.steps = False, [], 0

    def stage(self, text, total):
        self.stages.append((text, total))

    def advance(self, steps=1):
        self.steps += steps

    def interrupted(self):
        return self.stop


def test_cells_are_each_concept_merged_then_the_joint_prompt_merged_and_stacked():
    cells = preview_cells(SPECS, Path("/l/duo.safetensors"))
    assert [c.label for c in cells] == [
        "ohwx woman | merged",
        "zwx man | merged",
        "together | merged",
        "together | stacked",
    ]
    assert [c.prompt_with_tags() for c in cells] == [
        "ohwx woman <lora:duo:1>",
        "zwx man <lora:duo:1>",
        "ohwx woman and zwx man in a park <lora:duo:1>",
        "ohwx woman and zwx man in a park <lora:ohwx:1> <lora:zwx:0.8>",
    ]
    assert joint_prompt(["a", "b", "c"]) == "a, b and c in a park"


def test_grid_is_one_row_of_the_images_over_their_labels():
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "white")]
    grid = compose(images, ["a", "b", "a label far too long to fit under a 32 px image"])
    assert grid.size == (96, 32 + LABEL_HEIGHT)
    array = pixels(grid)
    assert (array[:32, :32] == (255, 0, 0)).all() and (array[:32, 32:64] == (0, 0, 255)).all()
    strip = array[32:, :]
    assert (strip < 128).any() and (strip[:, 64:] < 128).any()  # labels drawn, cut to fit


def test_every_cell_gets_the_same_seed_steps_and_size():
    progress = Stoppable()
    renderer = Flat()
    cells = preview_cells(SPECS, Path("/l/duo.safetensors"))
    grid = render_grid(cells, renderer, progress, seed=7, steps=3, size=16, cfg=7.0)
    assert [c[1:] for c in renderer.calls] == [(7, 3, 16)] * 4
    assert progress.stages == [("Preview images", 4)] and progress.steps == 4
    assert grid.image.size == (64, 16 + LABEL_HEIGHT)
    assert "4 images, flat, 3 steps at 16 px, CFG 7, seed 7" in grid.summary()
    assert Image.open(io.BytesIO(grid.png())).size == grid.image.size


def test_interrupt_stops_before_the_next_image():
    progress = Stoppable()
    renderer = Flat(stop_after=1, progress=progress)
    cells = preview_cells(SPECS, Path("/l/duo.safetensors"))
    with pytest.raises(MergeInterruptedError, match="merged LoRA was saved"):
        render_grid(cells, renderer, progress, seed=0, steps=1, size=8, cfg=7.0)
    assert len(renderer.calls) == 1


def _result(path: Path) -> MergeResult:
    return MergeResult(
        path=path,
        factors={},
        layers=[],
        triggers=[],
        seconds={"collect": 1.0},
        options=MergeOptions(size=64, seed=3),
        device="cpu",
        concepts=SPECS,
    )


def test_a_failed_or_stopped_preview_keeps_the_merge_and_says_why(tmp_path):
    written = tmp_path / "duo.safetensors"
    written.write_bytes(b"merged")
    result = add_preview(_result(written), Flat(fail=True))
    assert result.preview is None
    assert "RuntimeError: sampler exploded" in result.preview_note
    assert "merged LoRA was saved" in result.preview_note
    assert written.read_bytes() == b"merged" and "preview" not in result.seconds

    progress = Stoppable()
    stopped = add_preview(_result(written), Flat(stop_after=2, progress=progress), progress)
    assert stopped.preview is None and stopped.preview_note.startswith("Preview stopped")

    drawn = add_preview(_result(written), Flat(), Stoppable(), steps=2)
    assert drawn.preview is not None and drawn.preview_note == ""
    assert (drawn.preview.steps, drawn.preview.size, drawn.preview.seed) == (2, 64, 3)
    assert drawn.seconds["preview"] == drawn.preview.seconds


@pytest.fixture
def merged(tiny, tmp_path):
    """Two random LoRAs merged on the tiny SD1 pipeline (file written)."""
    host = tiny["host"]
    specs = [
        ConceptSpec(tiny["src"] / "sks_dog.safetensors", "sks dog"),
        ConceptSpec(tiny["src"] / "people" / "zwx_cat.safetensors", "zwx cat"),
    ]
    plan = plan_merge(
        specs,
        MergeOptions(**FAST),
        host.architecture,
        tmp_path / "duo.safetensors",
        check_shapes=False,
    )
    return host, run_merge(plan, host)


def test_standalone_renderer_draws_the_files_with_the_pipelines_own_sampler(merged):
    host, result = merged
    renderer = StandaloneRenderer(host, check_shapes=False)
    before = [weights_fingerprint(m) for m in (host.pipe.unet, host.pipe.text_encoder)]
    add_preview(result, renderer, steps=2)
    grid = result.preview
    assert grid is not None, result.preview_note
    assert grid.sampler == type(host.pipe.scheduler).__name__
    images = [pixels(i) for i in grid.images]
    assert all(i.shape == (64, 64, 3) for i in images)
    plain = pixels(
        renderer.render(PreviewCell("base", "sks dog", ()), seed=0, steps=2, size=64, cfg=7.0)
    )
    # The tiny random VAE mutes differences (measured: mean 0.33 and 0.77 levels, max 5
    # and 8); equal images would be 0 and 0.
    assert np.abs(images[0] - plain).mean() > 0.1  # the merged LoRA changes the image
    assert np.abs(images[0] - plain).max() >= 3
    assert np.abs(images[2] - images[3]).mean() > 0.1  # merged differs from stacked
    assert np.abs(images[2] - images[3]).max() >= 3
    again = renderer.render(grid.cells[3], seed=0, steps=2, size=64, cfg=7.0)
    assert (pixels(again) == images[3]).all()  # same seed, same bytes
    assert [weights_fingerprint(m) for m in (host.pipe.unet, host.pipe.text_encoder)] == before


def test_a_lora_at_strength_zero_point_five_is_half_way(merged, tmp_path):
    """Strength scales the files' deltas: strength 0 equals no LoRA at all."""
    host, result = merged
    renderer = StandaloneRenderer(host, check_shapes=False)
    zero = PreviewCell("zero", "sks dog", (LoraUse(result.path, 0.0),))
    none = PreviewCell("none", "sks dog", ())
    a = renderer.render(zero, seed=1, steps=2, size=64, cfg=7.0)
    b = renderer.render(none, seed=1, steps=2, size=64, cfg=7.0)
    assert (pixels(a) == pixels(b)).all()
    torch.manual_seed(0)  # the renderer's noise comes from its own generator, not this one
    c = renderer.render(none, seed=1, steps=2, size=64, cfg=7.0)
    assert (pixels(c) == pixels(b)).all()


@pytest.mark.slow
def test_the_merged_image_is_what_diffusers_own_lora_loader_draws(sd1_demo, tmp_path):
    """A real third-party loader: the merged file loaded by diffusers ``load_lora_weights``
    into a fresh copy of the same model gives the same picture, seed for seed."""
    pytest.importorskip("peft", reason="diffusers needs peft to load LoRAs")
    from loraclr_ext.demo.run import CONCEPTS
    from loraclr_ext.hosts.standalone import StandaloneHost

    host = sd1_demo["host"]
    specs = [ConceptSpec(p, c) for p, (c, _) in zip(sd1_demo["loras"][:2], CONCEPTS, strict=False)]
    plan = plan_merge(
        specs,
        MergeOptions(**FAST),
        host.architecture,
        tmp_path / "duo.safetensors",
        check_shapes=False,
    )
    result = run_merge(plan, host)
    prompt = joint_prompt([s.prompt for s in specs])
    cell = PreviewCell("merged", prompt, (LoraUse(result.path, 1.0),))
    ours = pixels(
        StandaloneRenderer(host, check_shapes=False).render(cell, seed=5, steps=3, size=64, cfg=7.0)
    )
    pipe = StandaloneHost.load(sd1_demo["model"], "cpu").pipe
    assert pipe.vae is None
    pipe.set_progress_bar_config(disable=True)

    def draw():
        generator = torch.Generator("cpu").manual_seed(5)
        out = pipe(
            prompt=prompt,
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=7.0,
            generator=generator,
            output_type="latent",  # the demo model has no VAE; the renderer shows latents
        )
        return pixels(latent_image(out.images[0], 64))

    plain = draw()
    pipe.load_lora_weights(str(result.path))
    theirs = draw()
    assert np.abs(theirs - plain).max() >= 3  # the loaded LoRA does change the picture
    assert np.abs(ours - theirs).max() <= 1  # at most the last bit of rounding
