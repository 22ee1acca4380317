"""kohya LoRA / LoCon (``lora_down``/``lora_up``, optional ``lora_mid``) and diffusers/PEFT.

Shapes in a file:
    down ``[r, in]`` or ``[r, in, kh, kw]``; up ``[out, r]`` or ``[out, r, 1, 1]``;
    LyCORIS CP-decomposed LoCon: down ``[r, in, 1, 1]``, mid ``[r, r, kh, kw]``,
    up ``[out, r, 1, 1]``. PEFT ``lora_A`` is down, ``lora_B`` is up.
ΔW = scale · up @ down, scale = ``scale`` key, else ``alpha / r``, else 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from loraclr_ext.files.formats.base import (
    FormatError,
    Shape,
    ShapeInfo,
    alpha_scale,
    kernel_of,
    require,
)
from loraclr_ext.model.deltas import ModuleDelta


def _info(down: Shape, up: Shape, mid: Shape | None) -> ShapeInfo:
    """Delta shape of an up/down(/mid) triple; raises FormatError when they disagree."""
    rank = int(down[0])
    if int(up[1]) != (int(mid[0]) if mid is not None else rank):
        raise FormatError(f"up {list(up)} and down {list(down)} have different ranks")
    if mid is not None:
        if int(mid[1]) != rank or len(mid) != 4:
            raise FormatError(f"lora_mid {list(mid)} does not fit down {list(down)}")
        kernel = kernel_of(mid)
        flat_in = int(down[1]) * kernel[0] * kernel[1]  # type: ignore[index]
    else:
        kernel = kernel_of(down)
        flat_in = 1
        for d in down[1:]:
            flat_in *= int(d)
    return ShapeInfo(int(up[0]), flat_in, kernel, int(up[1]))


def _build(
    down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None, scale: float
) -> ModuleDelta:
    """Exact factors; a CP ``mid`` core is folded into down (rank unchanged)."""
    info = _info(tuple(down.shape), tuple(up.shape), None if mid is None else tuple(mid.shape))
    up2 = up.float().reshape(up.shape[0], -1)
    if mid is not None:
        # D[n, (j, k, l)] = Σ_m mid[n, m, k, l] · down[m, j]
        down2 = torch.einsum("nmkl,mj->njkl", mid.float(), down.float().reshape(down.shape[0], -1))
        down2 = down2.reshape(down2.shape[0], -1)
    else:
        down2 = down.float().reshape(down.shape[0], -1)
    return ModuleDelta(up=up2.contiguous(), down=(down2 * scale).contiguous(), kernel=info.kernel)


class KohyaLora:
    """kohya ``networks.lora`` and LyCORIS LoCon."""

    name: ClassVar[str] = "lora"
    parts: ClassVar[frozenset[str]] = frozenset(
        {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
    )

    def shape_info(self, shapes: Mapping[str, Shape]) -> ShapeInfo:
        require(shapes, "lora_down.weight", "lora_up.weight")
        return _info(
            shapes["lora_down.weight"], shapes["lora_up.weight"], shapes.get("lora_mid.weight")
        )

    def build(self, tensors: Mapping[str, torch.Tensor]) -> tuple[ModuleDelta, str]:
        require(tensors, "lora_down.weight", "lora_up.weight")
        down, mid = tensors["lora_down.weight"], tensors.get("lora_mid.weight")
        delta = _build(down, tensors["lora_up.weight"], mid, alpha_scale(tensors, down.shape[0]))
        is_locon = mid is not None or (delta.kernel is not None and delta.kernel != (1, 1))
        return delta, "locon" if is_locon else "lora"


_PEFT_PAIRS: tuple[tuple[str, str], ...] = (
    ("lora_A.weight", "lora_B.weight"),
    ("lora.down.weight", "lora.up.weight"),
    ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
)


def _peft_pair(parts: Mapping[str, object]) -> tuple[str, str]:
    for down, up in _PEFT_PAIRS:
        if down in parts or up in parts:
            require(parts, down, up)
            return down, up
    raise FormatError("no lora_A/lora_B pair")


class PeftLora:
    """diffusers / PEFT ``lora_A``/``lora_B`` (and the older ``lora.down``/``lora.up`` and
    ``lora_linear_layer`` spellings). Scale = ``alpha / r`` when an ``alpha`` key exists,
    else 1 (PEFT's ``lora_alpha`` lives outside the tensors)."""

    name: ClassVar[str] = "peft"
    parts: ClassVar[frozenset[str]] = frozenset(p for pair in _PEFT_PAIRS for p in pair)

    def shape_info(self, shapes: Mapping[str, Shape]) -> ShapeInfo:
        down, up = _peft_pair(shapes)
        return _info(shapes[down], shapes[up], None)

    def build(self, tensors: Mapping[str, torch.Tensor]) -> tuple[ModuleDelta, str]:
        down_key, up_key = _peft_pair(tensors)
        down = tensors[down_key]
        return _build(down, tensors[up_key], None, alpha_scale(tensors, down.shape[0])), "peft"
