"""Reading and restoring host tensors of any kind, and the weight guard every host uses.

A host's tensors may be inference tensors (Forge builds its model, merges LoRAs and
conditions under ``@torch.inference_mode()``), may sit on any device (CUDA, MPS, the CPU
under lowvram) and may be stored in any float dtype. Outside inference mode an inference
tensor can be read but not viewed through a version-counted alias of a parameter whose
data was swapped, nor written in place; :func:`readable` and :func:`write_into` are the
two ways the hosts touch such tensors.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch

from loraclr_ext.solver.precision import solve_dtype


def readable(t: torch.Tensor) -> torch.Tensor:
    """``t``'s data as a plain detached tensor that reshapes, views and converts in any
    grad mode: ``.data`` skips the parameter wrapper, whose version counter an inference
    tensor (or a parameter made in inference mode whose data was later swapped outside
    it) does not have."""
    return t.data


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor. ``nn.Module.__getattr__`` is typed ``Tensor | Module``;
    this narrows it. A module without ``weight`` raises ``AttributeError`` as before; one
    whose ``weight`` is not a tensor (``None``, a submodule) raises a clear ``TypeError``."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is {type(weight).__name__}, not a tensor.")
    return weight


def to_cpu_float(t: torch.Tensor) -> torch.Tensor:
    """A new CPU fp32 tensor with ``t``'s values, never an inference tensor, never an
    alias of host memory, whatever ``t``'s device, dtype and inference state."""
    with torch.inference_mode(False):
        return readable(t).to("cpu", torch.float32, copy=True)


def plain_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on its own device that is a normal tensor (usable by autograd and in
    place), e.g. for a conditioning the host returned from inference mode."""
    with torch.inference_mode(False):
        return readable(t).clone()


def write_into(target: torch.Tensor, values: torch.Tensor) -> None:
    """``target.copy_(values)`` in the mode ``target`` needs: inference tensors may only be
    written in inference mode, other tensors in either."""
    with torch.inference_mode(readable(target).is_inference()), torch.no_grad():
        readable(target).copy_(values)


def _tensor_stats(t: torch.Tensor) -> torch.Tensor:
    """Sum, absolute sum and 16 evenly spaced elements of ``t``, on the CPU ``[18]``: fp64
    where the device has it, fp32 on one that has none (Apple MPS); the digest packs the
    values as Python floats either way."""
    with torch.inference_mode(False), torch.no_grad():
        flat = readable(t).reshape(-1)
        wide = solve_dtype(flat.device)  # fp64 where the device has it (not MPS)
        if not flat.is_floating_point():  # integer and bool buffers: small, cast them
            flat = flat.to(wide)
        sums = torch.stack([_chunked_sum(flat, wide), _chunked_sum(flat.abs(), wide)])
        # Integer arithmetic: a float32 linspace rounds indices past 2**24 out of range.
        idx = torch.arange(16, device=flat.device) * max(flat.numel() - 1, 0) // 15
        samples = flat[idx].to(wide) if flat.numel() else torch.zeros(16, dtype=wide)
        return torch.cat([sums, samples.to(sums.device)]).cpu()


CHUNK = 4096


def _chunked_sum(flat: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """Sum of ``flat`` as fp32 sums of consecutive runs of ``CHUNK`` elements, added in
    ``wide``. A run's order is fixed (one thread reduces it), so the result does not depend
    on the thread count; it is 20× faster on a CPU than widening every element to fp64
    (which cost 5 s per check of an SD 1.5 UNet), and a one-element change above ~1e-7 of
    its run's sum still shows."""
    whole = flat.numel() - flat.numel() % CHUNK
    runs = flat[:whole].reshape(-1, CHUNK).sum(dim=1, dtype=torch.float32)
    tail = flat[whole:].sum(dtype=torch.float32).reshape(1)
    return torch.cat([runs, tail]).to(wide).sum()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hex digest of every parameter and buffer of ``module``: names, shapes and values
    (fp64 sums and samples). Cheap enough for SDXL on a GPU (one transfer), and any merge
    of a LoRA into a weight changes it.

    The storage dtype is left out on purpose: a WebUI may recast a weight without changing
    its values (Forge casts the fp16-stored text embeddings to fp32 on its first
    conditioning, which the merge's conditioning may be), and that is no change to guard.
    """
    names: list[str] = []
    stats: list[torch.Tensor] = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        names.append(f"{name}:{tuple(tensor.shape)}")
        stats.append(_tensor_stats(tensor))
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
