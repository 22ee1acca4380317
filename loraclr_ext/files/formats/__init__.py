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
    "group_keys",
    "split_key",
]

ADAPTERS: list[Adapter] = [KohyaLora(), PeftLora(), LoHa(), LoKr(), FullDiff()]
KNOWN_PARTS: tuple[str, ...] = tuple(
    sorted(
        {p for a in ADAPTERS for p in a.parts}
        | SHARED_PARTS
        | set(UNSUPPORTED_PARTS)
        | set(SIDE_PARTS),
        key=len,
        reverse=True,
    )
)


def split_key(key: str) -> tuple[str, str] | None:
    """``'lora_unet_x.lora_down.weight'`` → (``'lora_unet_x'``, ``'lora_down.weight'``)."""
    for part in KNOWN_PARTS:
        if key.endswith("." + part) and len(key) > len(part) + 1:
            return key[: -len(part) - 1], part
    return None


def group_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group keys by module: ``{module: {part: key}}`` and the keys with no known part."""
    groups: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        split = split_key(key)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    return groups, unknown


def claim(parts: set[str]) -> Adapter:
    """The adapter for a group's parts; FormatError with the reason when none or several."""
    for part, reason in UNSUPPORTED_PARTS.items():
        if part in parts:
            raise FormatError(reason)
    own = parts - SHARED_PARTS
    if not own:
        raise FormatError("only alpha/scale, no weights")
    owners = [a for a in ADAPTERS if own & a.parts]
    if len(owners) != 1:
        names = ", ".join(a.name for a in owners)
        raise FormatError(f"parts of several formats in one module ({names})")
    stray = own - owners[0].parts
    if stray:
        raise FormatError(f"unexpected parts {sorted(stray)} for {owners[0].name}")
    return owners[0]
