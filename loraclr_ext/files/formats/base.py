"""What every format adapter shares: the adapter protocol, shape facts and scale rules.

A file's keys are split into ``<module name>.<part>`` (part = a known suffix such as
``lora_down.weight`` or ``hada_w1_a``) and grouped by module. Each group is claimed by the
one adapter whose parts it contains; the adapter reads the group's shapes (cheap, header
only) and builds its exact :class:`~loraclr_ext.model.deltas.ModuleDelta` from the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from loraclr_ext.model.deltas import ModuleDelta

Shape = tuple[int, ...]
SHARED_PARTS: frozenset[str] = frozenset({"alpha", "scale"})
"""Parts several formats use: the scale ``alpha / rank`` or A1111's explicit ``scale``."""

UNSUPPORTED_PARTS: dict[str, str] = {
    "on_input": "IA3",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "rescale": "OFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "bm.weight": "GLoRA",
}
"""Parts of algorithms we recognise but do not merge → the algorithm's name. A file with
such a module is refused by that name (its change would otherwise be lost silently)."""

SIDE_PARTS: dict[str, str] = {
    "diff_b": "bias delta (diff_b)",
    "bias": "bias delta",
    "w_norm": "norm-layer delta (w_norm)",
    "b_norm": "norm-layer delta (b_norm)",
}
"""Small extra parts the WebUIs apply beside (or instead of) a weight delta: bias and
norm-layer deltas (LyCORIS ``full.py`` / ``norms.py``). They are not merged; the keys are
listed as side parts, and a module's weight delta, if it has one, is still read."""


class FormatError(ValueError):
    """A key group cannot be read; the message is the reason.

    Attributes:
        kind: ``"unsupported"`` (a known algorithm we do not merge; ``algorithm`` names it),
            ``"shape"`` (the module exists but the delta does not fit it), ``"module"``
            (no such module) or ``"format"`` (inconsistent or unknown parts).
        algorithm: for ``"unsupported"``, e.g. ``"DoRA"``.
    """

    def __init__(self, message: str, kind: str = "format", algorithm: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.algorithm = algorithm


@dataclass(frozen=True)
class ShapeInfo:
    """What a group's shapes say about its module.

    Attributes:
        out_features: rows of ΔW.
        flat_in: columns of ΔW, ``in·kh·kw``.
        kernel: ``(kh, kw)`` when the file stores a conv delta, else ``None``.
        rank: nominal rank (``dim``) of the factors, ``None`` for an unfactored delta.
        in_features: input features/channels (``flat_in / (kh·kw)``).
    """

    out_features: int
    flat_in: int
    kernel: tuple[int, int] | None
    rank: int | None

    @property
    def in_features(self) -> int:
        kh, kw = self.kernel or (1, 1)
        return self.flat_in // (kh * kw)


class Adapter(Protocol):
    """One file format."""

    name: ClassVar[str]
    parts: ClassVar[frozenset[str]]

    def shape_info(self, shapes: Mapping[str, Shape]) -> ShapeInfo:
        """Read the module's delta shape from its parts' shapes (raises FormatError)."""
        ...

    def build(self, tensors: Mapping[str, torch.Tensor]) -> tuple[ModuleDelta, str]:
        """The exact delta (scale folded in) and the format label (raises FormatError)."""
        ...


def require(parts: Mapping[str, object], *names: str) -> None:
    """Raise FormatError naming the first missing part."""
    for name in names:
        if name not in parts:
            raise FormatError(f"missing '{name}'")


def alpha_scale(tensors: Mapping[str, torch.Tensor], rank: int | None) -> float:
    """The multiplier A1111 applies: ``scale`` if given, else ``alpha / rank``, else 1.

    kohya treats ``alpha == 0`` like a missing alpha (scale 1).
    """
    if "scale" in tensors:
        return float(tensors["scale"].item())
    if "alpha" in tensors and rank:
        alpha = float(tensors["alpha"].item())
        return alpha / rank if alpha else 1.0
    return 1.0


def kernel_of(shape: Shape) -> tuple[int, int] | None:
    """``(kh, kw)`` of a 4-D conv weight shape, ``None`` for 2-D."""
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else None
