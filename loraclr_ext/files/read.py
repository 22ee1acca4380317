"""Read a LoRA file of any supported format into exact per-module deltas.

Entry points:

* :func:`read_lora` — full read: every matched module becomes a
  :class:`~loraclr_ext.model.deltas.ModuleDelta` (fp32, ``alpha/rank`` folded into ``down``).
* :func:`describe_lora` — cheap: header, metadata and shapes only, never raises for a bad
  file (the reason is returned), for the WebUI list and the ``inspect`` command.

Only ``.safetensors`` is read; pickles are refused because loading one runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from loraclr_ext.errors import (
    ArchitectureMismatchError,
    LoraClrError,
    LoraFileError,
    UnmatchedKeysError,
)
from loraclr_ext.files.detect import foreign_architecture, lora_architecture
from loraclr_ext.files.dora import bake
from loraclr_ext.files.formats import FormatError, Shape
from loraclr_ext.files.match import Match, Plan, leftover_summary, plan_file, refusal
from loraclr_ext.files.scale import peft_configs
from loraclr_ext.files.triggers import Triggers, find_triggers
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import LoraFile, ModuleDelta
from loraclr_ext.model.targets import ModuleRef

PICKLE_SUFFIXES = frozenset({".pt", ".ckpt", ".pth", ".bin"})
_HASH_CHUNK = 1 << 20  # bytes per read when hashing


# ----------------------------------------------------------------------------- file level


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the whole file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pickle_error(path: Path) -> LoraFileError:
    return LoraFileError(
        f"{path} is a pickle; pickles can run code when loaded, so they are not read. "
        "Convert it to .safetensors (e.g. with kohya's or the WebUI's converter) and retry."
    )


def check_container(path: Path) -> None:
    """Refuse missing files, pickles and files that are not safetensors at all.

    A safetensors file starts with an 8-byte little-endian header length followed by a
    JSON object; a torch pickle starts with a zip signature or the pickle opcode 0x80.
    The safetensors layout is tested first: its first byte is the header length's low
    byte, which is 0x80 for one header length in 256.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path)
    if path.is_dir():
        raise LoraFileError(f"{path} is a folder, not a LoRA file.")
    if not path.is_file():
        raise LoraFileError(f"{path} does not exist.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 2 <= header_len <= size - 8
    if looks_safetensors:
        return
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise _pickle_error(path)
    if len(head) < 9:
        raise LoraFileError(f"{path} is empty or truncated ({size} bytes); download it again.")
    raise LoraFileError(
        f"{path} is not a valid .safetensors file (corrupt or truncated header); download it again."
    )


def read_header(path: Path) -> tuple[dict[str, Shape], dict[str, str]]:
    """Every tensor key → shape, and the ``__metadata__`` map, without loading tensors."""
    check_container(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: tuple(int(d) for d in f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises its own (Rust) error types
        raise LoraFileError(
            f"{path} cannot be read as .safetensors ({exc}); it is corrupt or truncated — "
            "download it again."
        ) from exc
    return shapes, metadata


# ----------------------------------------------------------------------------- matching


def _what(path: Path, fmt: str, arch: Architecture | None) -> str:
    """``x.safetensors (LoCon, SD 1.x)``: what a refusal says the file is."""
    kind = {"peft": "PEFT LoRA", "lora": "LoRA", "locon": "LoCon"}.get(fmt, fmt or "LoRA")
    return f"{path.name} ({kind}{', ' + arch.label if arch else ''})"


def _refuse_foreign(
    path: Path, shapes: Mapping[str, Shape], metadata: Mapping[str, str], hint: Architecture | None
) -> None:
    """ArchitectureMismatchError naming the family of a Flux / SD3 / … file."""
    found = foreign_architecture(shapes, metadata)
    if found is None:
        return
    family, n, total = found
    base = f"the base model is {hint.label}" if hint else "this merge works on SD 1.x/2.x/SDXL"
    raise ArchitectureMismatchError(
        f"{path.name} is a {family} LoRA ({n} of {total} modules are {family} modules), but "
        f"{base}; merging {family} LoRAs is not supported."
    )


def _resolve_arch(
    path: Path,
    shapes: Mapping[str, Shape],
    metadata: Mapping[str, str],
    arch_hint: Architecture | None,
    check_shapes: bool = True,
) -> tuple[Architecture | None, Architecture, Plan]:
    """(reported architecture, architecture used for names, plan).

    Raises ArchitectureMismatchError when the file is clearly for another architecture
    than ``arch_hint`` or for a family this merge does not handle (Flux, SD3, …). When
    nothing decides, names are matched against the architecture that matches most
    modules and the reported architecture is ``None``.
    """
    _refuse_foreign(path, shapes, metadata, arch_hint)
    peft = peft_configs(metadata)
    detected = lora_architecture(shapes, metadata)
    if arch_hint is not None and detected is not None and detected is not arch_hint:
        raise ArchitectureMismatchError(
            f"{path.name} is a {detected.label} LoRA but the base model is {arch_hint.label}; "
            f"use a LoRA trained for {arch_hint.label} or load a {detected.label} checkpoint."
        )
    chosen = detected or arch_hint
    if chosen is not None:
        return chosen, chosen, plan_file(shapes, chosen, check_shapes, peft)
    plans = {arch: plan_file(shapes, arch, check_shapes, peft) for arch in Architecture}
    best = max(Architecture, key=lambda a: len(plans[a].matches))  # ties: SD1 first
    return None, best, plans[best]


# ----------------------------------------------------------------------------- reading


def _label(match: Match) -> str:
    """Format label of a group from shapes alone (``lora`` vs ``locon`` by conv kernel;
    ``+dora`` for a weight-decomposed module)."""
    name = match.adapter.name
    if name == "lora":
        is_conv = "lora_mid.weight" in match.keys or match.kernel not in (None, (1, 1))
        name = "locon" if is_conv else "lora"
    return f"{name}+dora" if match.dora else name


def _join_labels(labels: set[str]) -> str:
    """``'+'``-joined labels; LoCon files contain plain LoRA modules too, so those merge;
    ``dora`` goes last (``lora+dora``)."""
    labels = {part for label in labels for part in label.split("+")}
    dora = "dora" in labels
    labels.discard("dora")
    if "locon" in labels:
        labels = labels - {"lora"}
    joined = "+".join(sorted(labels)) if labels else "unknown"
    return f"{joined}+dora" if dora else joined


def _native_kernel(delta: ModuleDelta, match: Match) -> ModuleDelta:
    """Give the delta the kernel decided when matching: the base module's own form for a
    1×1-conv/Linear (interchangeable: ``in·1·1 == in``) and the module's k×k kernel for a
    conv stored flattened, so downstream code sees the kernel the live module has."""
    linear_like = (None, (1, 1))
    if delta.kernel in linear_like and match.spec.kernel in linear_like:
        delta.kernel = match.spec.kernel
    elif delta.kernel is None and match.kernel is not None:
        delta.kernel = match.kernel
    return delta


def _load_tensors(f: object, path: Path, keys: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The group's tensors as fp32; LoraFileError on NaN/Inf."""
    tensors: dict[str, torch.Tensor] = {}
    for part, key in keys.items():
        tensor = f.get_tensor(key).float()  # type: ignore[attr-defined]
        if not torch.isfinite(tensor).all():
            raise LoraFileError(
                f"{path}: tensor '{key}' contains NaN or Inf values; the LoRA is broken "
                "(often an fp16 overflow during training) — use another epoch or file."
            )
        tensors[part] = tensor
    return tensors


def _refuse(
    path: Path,
    plan: Plan,
    arch: Architecture,
    reported: Architecture | None,
    limit: float,
    dora_ok: bool = True,
) -> None:
    fmt = _join_labels({_label(m) for m in plan.matches.values()})
    reason = refusal(plan, _what(path, fmt, reported), arch, limit, dora_ok)
    if reason is not None:
        raise UnmatchedKeysError(reason)


BaseWeight = Callable[[ModuleRef], torch.Tensor]
"""The base model's weight of a module, ``[out, in·kh·kw]`` fp32 (``Host.base_weight``)."""


def _bake_dora(
    path: Path, match: Match, delta: ModuleDelta, f: object, base_weight: BaseWeight
) -> ModuleDelta:
    """The exact LoRA of a DoRA module's applied change on the base weights."""
    magnitude = _load_tensors(f, path, {"m": match.dora})["m"]
    try:
        return bake(delta, base_weight(match.ref), magnitude, match.dora_axis)
    except FormatError as exc:
        raise LoraFileError(f"{path}: DoRA module '{match.ref}': {exc}.") from exc


def _dora_note(ranks: list[int]) -> str:
    return (
        f"DoRA: {len(ranks)} modules baked exactly with the base weights (rank "
        f"{min(ranks)}–{max(ranks)}); the merge's rank reduction reports what each layer keeps"
    )


def read_lora(
    path: str | Path,
    arch_hint: Architecture | None = None,
    max_unmatched_fraction: float = 0.1,
    *,
    check_shapes: bool = True,
    base_weight: BaseWeight | None = None,
) -> LoraFile:
    """Read a ``.safetensors`` LoRA of any supported format into exact per-module deltas.

    Args:
        path: the file.
        arch_hint: the loaded base model's architecture; used when the file does not say,
            and checked against what the file says.
        max_unmatched_fraction: refuse the file when more than this fraction of its
            modules map to no module of the architecture.
        check_shapes: require every delta to have the real model's shape for its module;
            pass ``False`` for miniature test models that keep the names but not the sizes.
        base_weight: the base model's weights; needed (only) by DoRA modules, whose
            applied change depends on them (:mod:`loraclr_ext.files.dora`).

    Raises:
        LoraFileError: missing, pickled, corrupt or truncated file; NaN/Inf tensors.
        ArchitectureMismatchError: the file is for another architecture than ``arch_hint``.
        UnmatchedKeysError: too many unmatched modules, or none matched.
    """
    path = Path(path)
    shapes, metadata = read_header(path)
    reported, arch, plan = _resolve_arch(path, shapes, metadata, arch_hint, check_shapes)
    _refuse(path, plan, arch, reported, max_unmatched_fraction, base_weight is not None)
    deltas: dict[ModuleRef, ModuleDelta] = {}
    labels: set[str] = set()
    dora_ranks: list[int] = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for match in plan.matches.values():
                tensors = _load_tensors(f, path, match.keys)
                if match.scale is not None:
                    tensors["scale"] = torch.tensor(match.scale)  # PEFT header scale
                try:
                    delta, _ = match.adapter.build(tensors)
                except FormatError as exc:
                    raise LoraFileError(f"{path}: module '{match.ref}': {exc}.") from exc
                delta = _native_kernel(delta, match)
                if match.dora and base_weight is not None:
                    delta = _bake_dora(path, match, delta, f, base_weight)
                    dora_ranks.append(delta.rank)
                deltas[match.ref] = delta
                labels.add(_label(match))
    except LoraClrError:
        raise
    except Exception as exc:
        raise LoraFileError(f"{path} cannot be read ({exc}); it may be corrupt.") from exc
    return LoraFile(
        path=path,
        architecture=reported,
        format=_join_labels(labels),
        deltas=deltas,
        unmatched=plan.unmatched,
        notes=([leftover_summary(plan)] if plan.leftovers else [])
        + ([_dora_note(dora_ranks)] if dora_ranks else []),
        metadata=metadata,
        triggers=find_triggers(metadata, path).words,
        sha256=file_sha256(path),
    )


def precheck_lora(
    path: str | Path, *, check_shapes: bool = True, max_unmatched_fraction: float = 0.1
) -> bool:
    """Raise for what no base model can fix, from the header alone: not a safetensors file
    (or a folder), another model family, OFT/IA3/GLoRA, bundled embeddings — and, when the
    file's architecture is known from it, every rule of :func:`read_lora` (kernels of
    flattened convs, shapes, lost components). :func:`read_lora` checks again against the
    loaded model's architecture.

    Returns:
        whether the file has DoRA modules (their reading needs the base weights).
    """
    path = Path(path)
    shapes, metadata = read_header(path)
    reported, arch, plan = _resolve_arch(path, shapes, metadata, None, check_shapes)
    if reported is not None:  # the file names its architecture: every rule applies now
        _refuse(path, plan, arch, reported, max_unmatched_fraction)
    elif plan.modules("unsupported", "embedding"):
        _refuse(path, plan, arch, reported, 1.0)
    return any(m.dora for m in plan.matches.values())


# ----------------------------------------------------------------------------- describing


@dataclass
class LoraInfo:
    """What the UI lists about a LoRA file, from its header alone.

    Attributes:
        name: file stem.
        path: the file.
        architecture: detected family, ``None`` if undecidable or unreadable.
        format: like :attr:`LoraFile.format`; ``""`` when unreadable.
        rank: largest nominal rank (``dim``) of its factored modules; ``None`` if none.
        modules: matched module count per component (``unet``, ``te1``, ``te2``).
        unmatched: how many file modules are not merged (side parts of read modules
            excluded).
        triggers: as :attr:`LoraFile.triggers`, plus bundled embedding names
            (:func:`~loraclr_ext.files.triggers.find_triggers` decides which words).
        found: the same words with their source and the file's tags, for
            :func:`~loraclr_ext.files.triggers.concept_prompts`.
        reason: why the file cannot be merged, ``None`` when it can.
        family: the model family in words (``SD 1.x``, ``Flux``…), ``None`` if unknown.
        ranks: every distinct nominal rank of its factored modules.
        not_merged: what will not be merged, by kind (``""`` when everything is read).
    """

    name: str
    path: Path
    architecture: Architecture | None = None
    format: str = ""
    rank: int | None = None
    modules: dict[str, int] = field(default_factory=dict)
    unmatched: int = 0
    triggers: list[str] = field(default_factory=list)
    reason: str | None = None
    family: str | None = None
    ranks: list[int] = field(default_factory=list)
    not_merged: str = ""
    found: Triggers = field(default_factory=lambda: Triggers([]))

    @property
    def usable(self) -> bool:
        return self.reason is None


def describe_lora(
    path: str | Path,
    arch_hint: Architecture | None = None,
    max_unmatched_fraction: float = 0.1,
    *,
    check_shapes: bool = True,
) -> LoraInfo:
    """Header-only summary of a LoRA; file problems go to :attr:`LoraInfo.reason`."""
    path = Path(path)
    info = LoraInfo(name=path.stem, path=path)
    try:
        shapes, metadata = read_header(path)
        info.found = find_triggers(metadata, path)
        info.triggers = list(info.found.words)
        foreign = foreign_architecture(shapes, metadata)
        info.family = foreign[0] if foreign else None
        reported, arch, plan = _resolve_arch(path, shapes, metadata, arch_hint, check_shapes)
    except LoraClrError as exc:
        info.reason = str(exc)
        return info
    info.architecture = reported
    info.family = reported.label if reported else None
    info.format = _join_labels({_label(m) for m in plan.matches.values()})
    ranks = sorted({m.info.rank for m in plan.matches.values() if m.info.rank is not None})
    info.rank = ranks[-1] if ranks else None
    info.ranks = ranks
    info.modules = dict(Counter(m.ref.component for m in plan.matches.values()))
    info.unmatched = len(plan.modules())
    info.not_merged = leftover_summary(plan)
    embedded = [x.label for x in plan.modules("embedding")]
    info.found = info.found.with_embedded(embedded)
    info.triggers = list(info.found.words)
    try:
        _refuse(path, plan, arch, reported, max_unmatched_fraction)
    except UnmatchedKeysError as exc:
        info.reason = str(exc)
    return info
