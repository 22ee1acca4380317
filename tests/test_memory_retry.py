"""Out of memory is not the end of a merge (issue 13): the UNet is given fewer latents per
call and the stage runs again from scratch, with the same result; the retry is said."""

from __future__ import annotations

import pytest
import torch

from loraclr_ext.engine import MAX_UNET_BATCH, run_merge, within_memory
from loraclr_ext.hosts.base import Conditioning, in_batches
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
from loraclr_ext.pipeline.plan import plan_merge

FAST = {"steps": 2, "size": 64, "iterations": 0, "precision": "fp32"}


def test_in_batches_is_the_whole_batch_in_pieces():
    latents = torch.randn(5, 4, 2, 2)
    cond = Conditioning(torch.randn(5, 7, 3), torch.randn(5, 6))
    seen = []

    def call(x, c):
        seen.append(x.shape[0])
        assert c.context.shape[0] == c.pooled.shape[0] == x.shape[0]
        return x * c.context.sum() + c.pooled.sum()

    whole = in_batches(call, latents, cond, None)
    pieces = [call(latents[i : i + 2], cond.rows(i, i + 2)) for i in range(0, 5, 2)]
    seen.clear()
    assert torch.equal(in_batches(call, latents, cond, 2), torch.cat(pieces))
    assert seen == [2, 2, 1]
    assert whole.shape == (5, 4, 2, 2)


class Budget:
    """A device that holds one latent's activations: a UNet call on more raises the error
    torch raises when CUDA runs out of memory."""

    def __init__(self, unet, latents: int):
        self.latents, self.refused, self.calls = latents, 0, []
        self.handle = unet.register_forward_pre_hook(self.check)

    def check(self, module, args):
        batch = int(args[0].shape[0])
        self.calls.append(batch)
        if batch > self.latents:
            self.refused += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")


def plan_for(demo, tmp_path, name, **extra):
    """Two of the demo's concept LoRAs (text encoder and every UNet attention layer)."""
    from loraclr_ext.demo.run import CONCEPTS

    host = demo["host"]
    specs = [ConceptSpec(p, c) for p, (c, _) in zip(demo["loras"][:2], CONCEPTS, strict=False)]
    options = MergeOptions(**{**FAST, **extra})
    return plan_merge(specs, options, host.architecture, tmp_path / name, check_shapes=False)


@pytest.mark.parametrize("quality", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_out_of_memory_runs_again_in_smaller_batches_with_the_same_result(
    quality, sd1_demo, tmp_path
):
    host = sd1_demo["host"]
    free = run_merge(plan_for(sd1_demo, tmp_path, "free.safetensors", quality=quality), host)
    budget = Budget(host.pipe.unet, latents=1)
    try:
        tight = run_merge(plan_for(sd1_demo, tmp_path, "tight.safetensors", quality=quality), host)
    finally:
        budget.handle.remove()
        host.max_batch = None
    assert budget.refused >= 1 and max(budget.calls[budget.refused :]) == 1
    # halved from the largest batch a stage sends, down to one latent per call
    expected = []
    before = MAX_UNET_BATCH
    while before > 1:
        expected.append(f"with {before} images per UNet call; ran again with {before // 2}")
        before //= 2
    assert len(tight.notes) == len(expected)
    assert all(e in n for e, n in zip(expected, tight.notes, strict=True)), tight.notes
    assert tight.notes[0].startswith("Out of CPU memory")
    for ref, delta in free.factors.items():
        got = tight.factors[ref].up @ tight.factors[ref].down
        want = delta.up @ delta.down
        # float sums in another order only (measured ≤ 1.6e-5); the fp16 file rounds at 4.9e-4
        assert float((got - want).norm() / want.norm()) < 1e-4, ref
    if quality:
        a, b = free.report.to_dict(), tight.report.to_dict()
        for ma, mb in zip(a["methods"], b["methods"], strict=True):
            for ca, cb in zip(ma["concepts"], mb["concepts"], strict=True):
                assert ca["unet"] == pytest.approx(cb["unet"], rel=1e-4, abs=1e-6)
    assert tight.path.is_file() and free.path.is_file()


def test_out_of_memory_at_one_latent_is_the_end(tiny, tmp_path):
    host = tiny["host"]
    notes: list[str] = []
    calls = []

    def run():
        calls.append(host.max_batch)
        raise torch.OutOfMemoryError("CUDA out of memory")

    try:
        with pytest.raises(torch.OutOfMemoryError):
            within_memory(host, run, notes)
    finally:
        host.max_batch = None
    assert calls[0] is None and calls[-1] == 1 and len(notes) == len(calls) - 1
