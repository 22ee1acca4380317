"""Recording defaults chosen per device: a CPU-only merge takes minutes, not an hour."""

from __future__ import annotations

import pytest
import torch

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.pipeline.options import AUTO_RECORDING, MergeOptions, auto_recording


def test_recording_defaults_follow_the_device():
    options = MergeOptions()
    assert options.steps is None and options.size is None
    assert options.auto == ["steps", "size"]
    cpu = options.resolved(torch.device("cpu"))
    assert (cpu.steps, cpu.size) == AUTO_RECORDING["cpu"]
    assert (cpu.steps, cpu.size) == (4, 256)
    assert cpu.auto == []
    cuda = options.resolved("cuda:1")
    assert (cuda.steps, cuda.size) == (12, 512)
    assert auto_recording("mps") == (12, 512)
    assert auto_recording("xpu") == AUTO_RECORDING["cuda"]  # other accelerators: the GPU values
    mixed = MergeOptions(steps=3, size=0).resolved("cpu")  # 0 = auto, as the number fields say
    assert (mixed.steps, mixed.size) == (3, 256)
    assert MergeOptions(steps=3).auto == ["size"]


def test_explicit_recording_values_are_checked():
    with pytest.raises(InvalidInputError, match="multiple of 8 from 64"):
        MergeOptions(size=32)
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        MergeOptions(size=100)
    with pytest.raises(InvalidInputError, match="steps must be ≥ 0"):
        MergeOptions(steps=-1)
