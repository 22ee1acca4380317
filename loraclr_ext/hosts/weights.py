"""The weight guard every host uses: fingerprints that prove a merge changed no host weight."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch

from loraclr_ext.solver.precision import solve_dtype


def _tensor_stats(t: torch.Tensor) -> torch.Tensor:
    """Sum, absolute sum and 16 evenly spaced elements of ``t``, as fp64 ``[18]`` (fp32 on
    a device without fp64, such as Apple MPS)."""
    flat = t.detach().reshape(-1)
    wide = flat.to(solve_dtype(flat.device))  # fp64 where the device has it (not on MPS)
    # Integer arithmetic: a float32 linspace rounds indices past 2**24 out of range.
    idx = torch.arange(16, device=flat.device) * max(flat.numel() - 1, 0) // 15
    samples = wide[idx] if flat.numel() else torch.zeros(16, dtype=wide.dtype)
    return torch.cat([torch.stack([wide.sum(), wide.abs().sum()]), samples.to(wide.device)])


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hex digest of every parameter and buffer of ``module`` (names, shapes, dtypes and
    fp64 sums / samples). Cheap enough for SDXL on a GPU (one transfer), and any merge of a
    LoRA into a weight changes it."""
    names: list[str] = []
    stats: list[torch.Tensor] = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        names.append(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}")
        stats.append(_tensor_stats(tensor).cpu())
    digest = hashlib.sha256("|".join(names).encode())
    for s in stats:
        digest.update(struct.pack(f"{s.numel()}d", *s.tolist()))
    return digest.hexdigest()


def changed_weights(
    models: Sequence[torch.nn.Module], before: Sequence[str]
) -> list[torch.nn.Module]:
    """The ``models`` whose :func:`weights_fingerprint` is no longer ``before`` (same order):
    what every host's ``clean_weights`` checks on exit."""
    return [m for m, fp in zip(models, before, strict=True) if weights_fingerprint(m) != fp]
