"""Registry of small adapters, one per LoRA file format.

A file's keys are split into ``<module name>.<part>`` (part = a known suffix such as
``lora_down.weight`` or ``hada_w1_a``) and grouped by module. Each group is claimed by the
one adapter whose parts it contains; the adapter reads the group's shapes (cheap, header
only) and builds its exact :class:`~loraclr_ext.model.deltas.ModuleDelta` from the tensors.
"""

from __future__ import annotations

from loraclr_ext.files.formats.base import (
    SHARED_PARTS,
    SIDE_PARTS,
    UNSUPPORTED_PARTS,
    Adapter,
    FormatError,
    Shape,
    ShapeInfo,
)
from loraclr_ext.files.formats.full import FullDiff
from loraclr_ext.files.formats.lora import KohyaLora, PeftLora
from loraclr_ext.files.formats.lycoris import LoHa, LoKr

__all__ = [
    "ADAPTERS",
    "SIDE_PARTS",
    "Adapter",
    "FormatError",
    "Shape",
    "ShapeInfo",
    "claim",
]

ADAPTERS: list[Adapter] = [KohyaLora(), PeftLora(), LoHa(), LoKr(), FullDiff()]
ADAPTER_PARTS: frozenset[str] = frozenset(p for a in ADAPTERS for p in a.parts)


def claim(parts: set[str]) -> Adapter:
    """The adapter for a group's parts; FormatError (with its kind) when none or several."""
    for part, algorithm in UNSUPPORTED_PARTS.items():
        if part in parts:
            raise FormatError(f"{algorithm} ({part}) is not supported", "unsupported", algorithm)
    own = parts - SHARED_PARTS
    if not own:
        raise FormatError("only alpha/scale, no weights")
    if own <= {"weight", "bias"}:
        raise FormatError("a bare weight/bias (an IA3 vector or a norm layer), not a LoRA")
    owners = [a for a in ADAPTERS if own & a.parts]
    if len(owners) != 1:
        names = ", ".join(a.name for a in owners)
        raise FormatError(f"parts of several formats in one module ({names or 'none'})")
    stray = own - owners[0].parts
    if stray:
        raise FormatError(f"unexpected parts {sorted(stray)} for {owners[0].name}")
    return owners[0]
