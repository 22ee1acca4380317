"""The memory budget (issue 13): the statistics' size is known before recording, a budget
too small for them splits the layers into passes that give the same merge, a budget too
small for any pass is refused before any UNet call, and peak memory does not grow with the
recording's steps or size. Peaks are counted exactly by ``bench.live_bytes``."""

from __future__ import annotations

import pytest
import torch
from test_memory_retry import plan_for

from bench.live_bytes import LiveBytes
from loraclr_ext.engine import run_merge
from loraclr_ext.errors import InvalidInputError
from loraclr_ext.pipeline.collect import down_span
from loraclr_ext.pipeline.memory import GIB, latent_bytes, plan_memory
from loraclr_ext.pipeline.progress import SilentProgress
from loraclr_ext.solver import NEUTRAL, LayerStats


@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ranks", [(4, 4), (2, 5, 3)])
def test_footprint_is_what_the_statistics_allocate(ranks, rows_dtype):
    fan_in, seen = 48, 300
    downs = [torch.randn(r, fan_in) for r in ranks]
    with LiveBytes() as live:
        basis = down_span(downs)
        stats = LayerStats(downs, basis=basis, sample_size=64)
        for i in range(len(ranks)):
            for _ in range(3):
                stats.add(i, torch.randn(seen // 3, fan_in).to(rows_dtype))
        stats.add(NEUTRAL, torch.randn(50, fan_in))
        kept = live.now
    expected = LayerStats.footprint(fan_in, ranks, basis.shape[0], sample_bytes=rows_dtype.itemsize)
    assert kept == expected, (kept, expected)
    assert all(s.rows.dtype == rows_dtype for s in stats.samples)


class Stages(SilentProgress):
    def __init__(self):
        self.texts, self.steps, self.totals = [], [], []

    def stage(self, text, total):
        self.texts.append(text)
        self.totals.append(total)
        self.steps.append(0)

    def advance(self, steps=1):
        self.steps[-1] += steps


def _shapes(plan, host):
    from loraclr_ext.engine import flat_shape

    return {r: flat_shape(m) for r, m in host.modules(plan.refs).items()}


def test_a_small_budget_records_in_passes_with_the_same_result(sd1_demo, tmp_path):
    host = sd1_demo["host"]
    host.max_batch = 1  # what the small budget below allows, so only the passes differ
    try:
        whole = run_merge(plan_for(sd1_demo, tmp_path, "whole.safetensors", quality=False), host)
    finally:
        host.max_batch = None
    plan = plan_for(sd1_demo, tmp_path, "parts.safetensors", quality=False)
    resolved = plan.options.resolved(host.device)
    from dataclasses import replace

    stats = plan_memory(
        replace(plan, options=resolved), _shapes(plan, host), host.device, host.dtype
    )
    latent = latent_bytes(host.architecture, resolved.size, host.dtype)
    budget = (latent + stats.stats / 3) / GIB  # a third of the statistics: three passes or more
    progress = Stages()
    options = {"memory_budget": budget, "quality": False}
    try:
        parts = run_merge(
            plan_for(sd1_demo, tmp_path, "parts.safetensors", **options), host, progress
        )
    finally:
        host.max_batch = None  # the budget lowered it for this host
    passes = next(n for n in "3456789" if f"in {n} passes" in parts.notes[0])
    assert int(passes) >= 3
    assert progress.texts[0].startswith("Recording") and len(progress.texts) == 1
    assert progress.steps[0] == progress.totals[0]  # one stage, filled exactly
    assert parts.factors.keys() == whole.factors.keys()
    worst = max(
        float((f.dense() - parts.factors[ref].dense()).norm() / f.dense().norm())
        for ref, f in whole.factors.items()
    )
    assert worst == 0.0, worst  # the same sums in the same order, only split by layer
    assert "at most 1 image per UNet call" in parts.notes[0]
    assert not whole.notes


def test_a_budget_below_one_layer_is_refused_before_the_unet_runs(sd1_demo, tmp_path):
    host = sd1_demo["host"]
    calls = []
    handle = host.pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(InvalidInputError) as caught:
            run_merge(plan_for(sd1_demo, tmp_path, "no.safetensors", memory_budget=1e-6), host)
    finally:
        handle.remove()
    message = str(caught.value)
    assert "\n" not in message and "memory budget" in message and "set by the user" in message
    assert calls == [] and not (tmp_path / "no.safetensors").exists()


def _peak(sd1_demo, tmp_path, name, max_batch, **options):
    host = sd1_demo["host"]
    plan = plan_for(sd1_demo, tmp_path, name, quality=False, **options)
    host.max_batch = max_batch
    try:
        with LiveBytes() as live:
            run_merge(plan, host, write=False)
    finally:
        host.max_batch = None
    return live.peak


def test_peak_memory_is_flat_when_steps_or_size_double(sd1_demo, tmp_path):
    """At twice the size a recording call takes a quarter of the latents (the rule of
    ``recording_latents``, which only binds from 256 px, so the tiny sizes here set it by
    ``max_batch``): nothing else may grow with the pixels or steps recorded."""
    base = _peak(sd1_demo, tmp_path, "a.safetensors", 8, steps=2, size=64)
    steps = _peak(sd1_demo, tmp_path, "b.safetensors", 8, steps=4, size=64)
    size = _peak(sd1_demo, tmp_path, "c.safetensors", 2, steps=2, size=128)
    assert abs(steps / base - 1) <= 0.10, (base, steps)
    assert abs(size / base - 1) <= 0.10, (base, size)


def test_modules_the_model_lacks_are_skipped_not_a_crash(sd1_demo, tmp_path):
    """Up to a tenth of a LoRA's modules may be absent from the checkpoint (another
    model's extra layer): they are reported as skipped and the rest is merged."""
    from loraclr_ext.model.deltas import ModuleDelta
    from loraclr_ext.model.targets import ModuleRef

    host = sd1_demo["host"]
    plan = plan_for(sd1_demo, tmp_path, "extra.safetensors", quality=False)
    extra = ModuleRef("unet", "down_blocks.9.attentions.0.proj_in")
    plan.concepts[0].deltas[extra] = ModuleDelta(torch.ones(4, 2), torch.ones(2, 4), None)
    result = run_merge(plan, host, write=False)
    assert result.skipped == [str(extra)]
    assert extra not in result.factors and len(result.factors) == len(plan.refs) - 1


def test_the_automatic_budget_on_a_cpu_is_the_available_ram(sd1_demo, tmp_path):
    from dataclasses import replace
    from pathlib import Path

    host = sd1_demo["host"]
    plan = plan_for(sd1_demo, tmp_path, "auto.safetensors")
    plan = replace(plan, options=plan.options.resolved(host.device))
    memory = plan_memory(plan, _shapes(plan, host), host.device, host.dtype)
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if "MemAvailable" in x)
    available = int(line.split()[1]) * 1024
    assert memory.source == "available RAM"
    assert 0.5 * available < memory.budget <= 0.9 * available * 1.05
    assert len(memory.passes) == 1 and memory.passes[0] == plan.refs
    assert memory.unet_batch is None
    assert memory.summary().startswith("Memory budget ") and "passes" not in memory.summary()


def _refusal(plan, shapes, host, budget_gb):
    from dataclasses import replace

    options = replace(plan.options, memory_budget=budget_gb).resolved(host.device)
    try:
        plan_memory(replace(plan, options=options), shapes, host.device, host.dtype)
    except InvalidInputError as error:
        return str(error)
    return None


@pytest.mark.parametrize("share", [20, 24, 40])
def test_the_least_budget_a_refusal_advises_is_enough_and_no_more(sd1_demo, tmp_path, share):
    """Whole layers go into each pass, so the least budget for 16 passes is above a
    sixteenth of the statistics (a live run advised 6.64 MB and refused 6.86)."""
    import re

    from loraclr_ext.pipeline.memory import MAX_PASSES, layer_bytes

    host = sd1_demo["host"]
    plan = plan_for(sd1_demo, tmp_path, "x.safetensors", quality=False)
    shapes = _shapes(plan, host)
    resolved = plan.options.resolved(host.device)
    total = sum(layer_bytes(plan, shapes, host.dtype.itemsize).values())
    latent = latent_bytes(host.architecture, resolved.size, host.dtype)
    message = _refusal(plan, shapes, host, (latent + total / share) / GIB)
    assert message is not None and "\n" not in message
    advised = re.search(r"at least ([\d.]+) MB", message)
    assert advised, message
    advised_gb = float(advised.group(1)) * 2**20 / GIB
    assert _refusal(plan, shapes, host, advised_gb) is None, message
    assert _refusal(plan, shapes, host, advised_gb * 0.99) is not None
    from dataclasses import replace

    options = replace(resolved, memory_budget=advised_gb)
    memory = plan_memory(replace(plan, options=options), shapes, host.device, host.dtype)
    assert 1 < len(memory.passes) <= MAX_PASSES
