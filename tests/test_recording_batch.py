"""Concepts side by side in the recording run (issue 13): each concept's latents start
from the same noise and run with only its own LoRA, a call's pixels stay bounded, and the
merge equals the one made a concept at a time."""

from __future__ import annotations

import pytest
import torch

from loraclr_ext.errors import LoraClrError
from loraclr_ext.hosts.base import seeded_noise
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.collect import (
    RECORDING_PIXELS,
    SPATIAL_PROMPTS,
    recording_groups,
    recording_latents,
)
from loraclr_ext.pipeline.hooks import Blocks, applied, applied_in_blocks, recording_in_blocks


def test_noise_repeats_per_block_as_each_block_would_draw_alone():
    alone = seeded_noise(2, 4, 8, seed=3)
    side_by_side = seeded_noise(6, 4, 8, seed=3, period=2)
    assert all(torch.equal(side_by_side[k : k + 2], alone) for k in (0, 2, 4))
    gen = torch.Generator("cpu").manual_seed(3)
    assert torch.equal(seeded_noise(6, 4, 8, seed=3), torch.randn((6, 4, 8, 8), generator=gen))
    with pytest.raises(ValueError, match="not made of blocks"):
        seeded_noise(5, 4, 8, seed=3, period=2)


@pytest.mark.parametrize("size", [256, 384, 512, 768, 1024])
@pytest.mark.parametrize("max_batch", [None, 1, 2, 3, 5, 8, 64])
def test_groups_keep_a_call_within_its_pixels_and_the_host_limit(size, max_batch):
    runs = list(range(13))  # 12 concepts and the neutral prompts
    groups = recording_groups(runs, max_batch, size)  # type: ignore[arg-type]
    assert [r for g in groups for r in g] == runs
    for group in groups:
        latents = len(group) * SPATIAL_PROMPTS
        if len(group) > 1:
            assert latents * size**2 <= RECORDING_PIXELS
            assert max_batch is None or latents <= max_batch
    expected = max(1, min(recording_latents(size), max_batch or 10**9) // SPATIAL_PROMPTS)
    assert len(groups[0]) == expected
    if size == 256 and max_batch is None:
        assert len(groups) == 4  # 4 concepts per call: 8 latents at 256 px


def _linear_and_deltas(blocks: int):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5).double()
    ref = ModuleRef("unet", "x")
    deltas = [
        {ref: ModuleDelta(torch.randn(5, 2).double(), torch.randn(2, 6).double())}
        for _ in range(blocks - 1)
    ] + [{}]  # the last block has no LoRA (the neutral prompts)
    return layer, ref, deltas


def test_each_block_runs_with_its_own_lora_and_records_to_its_own_owner():
    layer, ref, deltas = _linear_and_deltas(3)
    x = torch.randn(3 * SPATIAL_PROMPTS, 4, 6, dtype=torch.float64)
    blocks = Blocks([0, 1, -1], deltas, SPATIAL_PROMPTS)
    seen: dict[int, list[torch.Tensor]] = {}

    def sink(owner):
        return lambda r, rows, w: seen.setdefault(owner, []).append(rows)

    modules = {ref: layer}
    with applied_in_blocks(modules, blocks), recording_in_blocks(modules, blocks, sink):
        together = layer(x)
    for k, owner in enumerate([0, 1, -1]):
        rows = slice(k * SPATIAL_PROMPTS, (k + 1) * SPATIAL_PROMPTS)
        with applied(modules, deltas[k]):
            alone = layer(x[rows])
        assert torch.allclose(together[rows], alone, rtol=0, atol=1e-12)
        assert torch.equal(torch.cat(seen[owner]), x[rows].reshape(-1, 6))
    assert not (together[:2] - layer(x[:2])).abs().max() < 1e-6  # the LoRA did apply


def test_a_call_on_part_of_a_mixed_batch_is_refused_and_one_owner_takes_any_part():
    _, _, deltas = _linear_and_deltas(2)
    with pytest.raises(LoraClrError, match="split the recording batch"):
        Blocks([0, 1], deltas, SPATIAL_PROMPTS).split(SPATIAL_PROMPTS)
    assert Blocks([0], deltas[:1], SPATIAL_PROMPTS).split(1) == [(0, slice(0, 1))]


def test_concepts_side_by_side_share_unet_calls(sd1_demo, tmp_path):
    """Three runs (two concepts and the neutral prompts) at 64 px go as one batch of six
    latents per step; one latent per call gives the same merge (the retry test compares
    the factors), so here only the calls are counted."""
    from test_memory_retry import plan_for

    from loraclr_ext.engine import run_merge

    host = sd1_demo["host"]
    calls: list[int] = []
    handle = host.pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        run_merge(plan_for(sd1_demo, tmp_path, "m.safetensors", quality=False), host)
    finally:
        handle.remove()
    assert calls == [3 * SPATIAL_PROMPTS] * 2  # 2 steps, one call each
