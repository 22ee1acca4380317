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
from loraclr_ext.report.quality import report_pixels, report_prompts, report_size


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
