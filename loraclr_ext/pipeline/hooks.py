"""Forward hooks: apply a LoRA delta to a module's output, record a module's inputs.

Host weights are never written: a concept is applied by adding ``up(down(x))`` to the
output of each module it touches, and every hook is removed when its context exits,
also on error or interrupt.

Hooks fire inside the host's own code, which may run in inference mode (Forge). Every hook
body leaves inference mode, so what it makes (deltas added to outputs, recorded rows) is
an ordinary tensor the solver can use with autograd, while the host's inputs to it may be
inference tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraclr_ext.errors import LoraClrError
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.solver.features import ConvGeometry, input_rows


def is_conv(module: torch.nn.Module) -> bool:
    """A conv module by its weight's rank (hosts may wrap ``nn.Conv2d`` in other classes)."""
    weight = getattr(module, "weight", None)
    return weight is not None and weight.ndim == 4


def delta_output(module: torch.nn.Module, delta: ModuleDelta, x: torch.Tensor) -> torch.Tensor:
    """``ΔW x`` for the module's input ``x``, in ``x``'s dtype and device.

    Linear: ``x [..., in]`` → ``[..., out]``. Conv: ``x [B, C, H, W]`` → ``[B, out, H', W']``
    with the module's own stride, padding and dilation.
    """
    up = delta.up.to(x.device, x.dtype)
    down = delta.down.to(x.device, x.dtype)
    if not is_conv(module):
        return F.linear(F.linear(x, down), up)
    geometry = ConvGeometry.of(module)
    kh, kw = geometry.kernel
    kernel = down.reshape(down.shape[0], -1, kh, kw)
    hidden = F.conv2d(
        x, kernel, stride=geometry.stride, padding=geometry.padding, dilation=geometry.dilation
    )
    return F.conv2d(hidden, up[:, :, None, None])


@contextmanager
def applied(
    modules: Mapping[ModuleRef, torch.nn.Module], deltas: Mapping[ModuleRef, ModuleDelta]
) -> Iterator[None]:
    """Run the model as if ``deltas`` were added to the weights of ``modules`` (one block
    of any size: :func:`applied_in_blocks`)."""
    with applied_in_blocks(modules, Blocks([0], [deltas], 1)):
        yield


@contextmanager
def outside_inference() -> Iterator[None]:
    """Leave inference mode (if the host is in it) without enabling gradients."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _record(
    ref: ModuleRef,
    value: torch.Tensor,
    geometry: ConvGeometry | None,
    sink: RowSink,
    token_weights: Callable[[], torch.Tensor | None],
) -> None:
    """One module input ``value`` -> solver rows for ``sink`` (an inference tensor is copied
    first, so no row the sink keeps is one)."""
    x = value.detach()
    if x.is_inference():
        x = x.clone()
    weights = token_weights()
    if geometry is not None or x.ndim != 3:
        weights = None
    elif weights is not None and tuple(weights.shape) != tuple(x.shape[:2]):
        weights = None  # e.g. a UNet attention over pixels: not token-weighted
    rows = input_rows(x, geometry)
    sink(ref, rows, None if weights is None else weights.reshape(-1).to(rows.device))


RowSink = Callable[[ModuleRef, torch.Tensor, torch.Tensor | None], None]
"""Receives ``(ref, rows [t, in·kh·kw], weights [t] or None)`` for every forward call."""


@contextmanager
def recording(
    modules: Mapping[ModuleRef, torch.nn.Module],
    sink: RowSink,
    token_weights: Callable[[], torch.Tensor | None] = lambda: None,
) -> Iterator[None]:
    """Stream every input of ``modules`` to ``sink`` as solver rows.

    ``token_weights()`` returns the current batch's per-token weights ``[B, T]`` for
    Linear inputs ``[B, T, in]`` (text stages); conv and spatial inputs are weighted 1.
    (One block of any size: :func:`recording_in_blocks`.)
    """
    with recording_in_blocks(modules, Blocks([0], [{}], 1), lambda owner: sink, token_weights):
        yield


@dataclass(frozen=True)
class Blocks:
    """A UNet batch made of consecutive blocks of ``size`` latents, block ``k`` run as
    concept ``owners[k]`` with that concept's LoRA ``deltas[k]`` (design §2.2: several
    concepts share one denoising run, each on its own rows).

    The host may split a batch into UNet calls (:func:`~loraclr_ext.hosts.base.in_batches`);
    a call is then either the whole batch or, when every block has one owner, any part of
    it. The recording run groups concepts so that this holds.
    """

    owners: Sequence[int]
    deltas: Sequence[Mapping[ModuleRef, ModuleDelta]]
    size: int

    def split(self, batch: int) -> list[tuple[int, slice]]:
        """``(block, rows)`` of a module call on ``batch`` latents.

        Raises:
            LoraClrError: the call holds part of a batch of several owners.
        """
        if len(self.owners) == 1:
            return [(0, slice(0, batch))]
        if batch != len(self.owners) * self.size:
            raise LoraClrError(
                f"A UNet call on {batch} latents of a batch of {len(self.owners)} blocks of "
                f"{self.size}: the host split the recording batch."
            )
        return [(k, slice(k * self.size, (k + 1) * self.size)) for k in range(len(self.owners))]


@contextmanager
def applied_in_blocks(
    modules: Mapping[ModuleRef, torch.nn.Module], blocks: Blocks
) -> Iterator[None]:
    """Run the model as if each block's deltas were added to the weights of ``modules``, for
    that block's rows only (:func:`applied`, one LoRA per block)."""
    refs = {ref for deltas in blocks.deltas for ref, d in deltas.items() if d.rank}
    handles = []
    try:
        for ref in refs:
            module = modules.get(ref)
            if module is None:
                continue

            def hook(mod, args, output, ref=ref):
                with outside_inference():
                    pieces = []
                    for k, rows in blocks.split(output.shape[0]):
                        delta = blocks.deltas[k].get(ref)
                        piece = output[rows]
                        if delta is not None and delta.rank:
                            piece = piece + delta_output(mod, delta, args[0][rows])
                        pieces.append(piece)
                    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recording_in_blocks(
    modules: Mapping[ModuleRef, torch.nn.Module],
    blocks: Blocks,
    sink: Callable[[int], RowSink],
    token_weights: Callable[[], torch.Tensor | None] = lambda: None,
) -> Iterator[None]:
    """Stream every input of ``modules`` as solver rows, each block's rows to
    ``sink(owner)`` (``token_weights``: see :func:`recording`; they apply where their
    ``[B, T]`` matches a call's rows, so only to a batch of one block)."""
    sinks = [sink(owner) for owner in blocks.owners]
    handles = []
    try:
        for ref, module in modules.items():
            geometry = ConvGeometry.of(module) if is_conv(module) else None

            def hook(mod, args, output, ref=ref, geometry=geometry):
                with outside_inference():
                    for k, rows in blocks.split(args[0].shape[0]):
                        _record(ref, args[0][rows], geometry, sinks[k], token_weights)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
