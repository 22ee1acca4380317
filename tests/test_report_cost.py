"""The quality report's cost against the merge's, in UNet work (a benchmark measures time).

A default merge records ``steps`` denoising steps per concept; the report evaluates each
configuration (base, each LoRA alone, each method) once at a single timestep. Its UNet work
must stay a small share of the recording's, so that it costs at most a quarter of a merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from loraclr_ext.pipeline.collect import recording_pixels
from loraclr_ext.pipeline.options import MergeOptions
from loraclr_ext.report.quality import report_pixels, report_prompts, report_size, report_work


@dataclass
class _Concept:
    prompt: str


@dataclass
class _Plan:
    concepts: list[_Concept]
    options: MergeOptions


def plan(concepts: int, device: str) -> _Plan:
    return _Plan(
        [_Concept(f"tok{i} person") for i in range(concepts)], MergeOptions().resolved(device)
    )


def test_report_runs_at_half_the_recording_size():
    assert report_size(512) == 256
    assert report_size(256) == 128
    assert report_size(1024) == 256
    assert report_size(64) == 64  # never larger than the recording run


def test_report_prompts_are_held_out_then_neutral():
    prompts, neutral = report_prompts(plan(2, "cpu"))
    assert neutral == 2 and len(prompts) == 4
    assert prompts[0].endswith("tok0 person") and prompts[1].endswith("tok1 person")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_two_concept_report_is_at_most_a_third_of_the_recording(device):
    """≤ 1/3 of the recording's UNet work, so ≤ 1/4 of the merge before solve and write."""
    p = plan(2, device)
    assert report_pixels(p) <= recording_pixels(p) / 3


def test_report_work_grows_linearly_with_the_concepts():
    """Every LoRA on every prompt was quadratic (17 configurations × 14 prompts = 238 images
    at 12 concepts); each LoRA on its own and the neutral prompts, plus the others stacked
    on its own, is 118."""
    for n in (2, 4, 8, 12):  # base + 4 methods on n + 2 prompts, 3 per LoRA, 1 per others
        assert report_work(plan(n, "cpu")) == 5 * (n + 2) + 3 * n + n
    assert report_work(plan(12, "cpu")) == 118


@pytest.mark.parametrize("count", [2, 3])
def test_the_report_runs_exactly_report_work_unet_images(sd1_demo, tmp_path, count):
    """Images through the UNet during the report, counted by a hook on the real model."""
    from test_engine import specs

    from loraclr_ext.model.architecture import Architecture
    from loraclr_ext.pipeline.plan import plan_merge
    from loraclr_ext.pipeline.progress import SilentProgress
    from loraclr_ext.report.quality import baselines, evaluate

    host = sd1_demo["host"]
    options = MergeOptions(size=128, steps=1, quality=True)
    p = plan_merge(
        specs(sd1_demo, count),
        options,
        Architecture.SD1,
        tmp_path / "x.safetensors",
        check_shapes=False,
    )
    modules = host.modules(p.refs)
    merged = baselines(p)["stacked"]
    images = []
    handle = host.pipe.unet.register_forward_pre_hook(
        lambda m, args: images.append(int(args[0].shape[0]))
    )
    try:
        report = evaluate(p, host, modules, merged, {}, SilentProgress())
    finally:
        handle.remove()
    assert sum(images) == report_work(p, methods=3)
    stacking = report.method("stacked")
    assert [c.concept for c in stacking.concepts] == [c.name for c in p.concepts]
    # merged = stacking here, so the two rows agree exactly
    assert [c.leak for c in report.method("loraclr").concepts] == [
        c.leak for c in stacking.concepts
    ]
    assert all(0.5 < c.leak < 1.5 for c in stacking.concepts)
