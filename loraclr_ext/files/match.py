"""Match a file's module groups to an architecture's modules; classify every leftover.

Nothing is just counted: each key that is not read becomes a :class:`Leftover` of one
kind — another architecture (named), an algorithm we do not merge (named), a bundled
embedding (named; it is a trigger word), a side part (bias / norm delta), a module the
architecture does not have or whose shape does not fit, or an unknown key. The refusal
rules in :func:`refusal` decide which leftovers stop a merge; none is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from loraclr_ext.files.dora import DORA_PARTS, magnitude_axis
from loraclr_ext.files.formats import SIDE_PARTS, Adapter, FormatError, Shape, ShapeInfo, claim
from loraclr_ext.files.keys import component_of, foreign_family, group_keys, resolve_module
from loraclr_ext.files.scale import PeftConfig, peft_scale
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.naming import ModuleSpec, module_spec
from loraclr_ext.model.targets import ModuleRef

LEFTOVER_KINDS = ("foreign", "unsupported", "embedding", "side", "shape", "module", "format")
COMPONENT_NAMES = {"unet": "UNet", "te1": "text encoder", "te2": "second text encoder (CLIP-G)"}


@dataclass
class Match:
    """One file module group matched to a target module.

    Attributes:
        kernel: the conv kernel the delta takes — the file's, or the target module's when
            the file stores the conv factor flattened to ``[r, in·kh·kw]``.
        scale: a scale from the header (PEFT metadata), ``None`` when the tensors hold it.
        dora: the file key of the module's DoRA magnitude, ``""`` for a plain module.
        dora_axis: ``"out"`` or ``"in"`` (see :mod:`loraclr_ext.files.dora`).
    """

    ref: ModuleRef
    spec: ModuleSpec
    adapter: Adapter
    keys: dict[str, str]  # part → file key
    info: ShapeInfo
    kernel: tuple[int, int] | None
    scale: float | None = None
    dora: str = ""
    dora_axis: str = ""


@dataclass
class Leftover:
    """File keys that are not merged, and why.

    Attributes:
        module: the file's module name (or the key, for keys with no known part).
        keys: the file keys.
        kind: one of :data:`LEFTOVER_KINDS` or ``"unknown"``.
        reason: one phrase for the user.
        label: the named thing: family (``Flux``), algorithm (``DoRA``), embedding name,
            or ``""``.
        whole_module: ``False`` for side parts of a module whose weight delta is read.
    """

    module: str
    keys: list[str]
    kind: str
    reason: str
    label: str = ""
    whole_module: bool = True


@dataclass
class Plan:
    """How a file's keys map onto one architecture."""

    matches: dict[str, Match] = field(default_factory=dict)
    leftovers: list[Leftover] = field(default_factory=list)

    def modules(self, *kinds: str) -> list[Leftover]:
        return [x for x in self.leftovers if x.whole_module and (not kinds or x.kind in kinds)]

    @property
    def total_modules(self) -> int:
        return len(self.matches) + len(self.modules())

    @property
    def unmatched(self) -> list[str]:
        """``"key: reason"`` for every key not merged (side parts included)."""
        return [f"{key}: {x.reason}" for x in self.leftovers for key in x.keys]


# ----------------------------------------------------------------------------- matching


def flattened_kernel(
    info: ShapeInfo, spec: ModuleSpec, check_shapes: bool
) -> tuple[int, int] | None:
    """The kernel a delta takes on ``spec``'s module.

    A 2-D factor on a k×k conv is the conv stored flattened (``lora_down [r, in·kh·kw]``,
    ComfyUI's trainer; LyCORIS LoHa/LoKr ``hada_w?_b`` / ``lokr_w2_b`` without Tucker):
    it takes the module's kernel when the flattened size matches (with ``check_shapes``
    off, when it is a multiple of ``kh·kw``). Raises FormatError otherwise.
    """
    if info.kernel is not None or spec.kernel in (None, (1, 1)):
        return info.kernel
    kh, kw = spec.kernel
    fits = info.flat_in == spec.flat_in if check_shapes else info.flat_in % (kh * kw) == 0
    if not fits:
        raise FormatError(
            f"a flattened delta [{info.out_features}, {info.flat_in}] does not fit the "
            f"{kh}×{kw} conv {spec.ref} [{spec.out_features}, {spec.in_features}·{kh}·{kw}]",
            "shape",
        )
    return spec.kernel


def _match_group(
    module: str,
    keys: dict[str, str],
    shapes: Mapping[str, Shape],
    arch: Architecture,
    check_shapes: bool,
) -> Match:
    """Match one module group or raise FormatError with the reason and its kind."""
    keys = dict(keys)
    dora = {p: keys.pop(p) for p in DORA_PARTS if p in keys}
    if len(dora) > 1:
        raise FormatError("two DoRA magnitudes in one module")
    adapter = claim(set(keys))
    info = adapter.shape_info({part: shapes[key] for part, key in keys.items()})
    ref = resolve_module(module, arch)
    if ref is None:
        raise FormatError(f"no {arch.label} module is named '{module}'", "module")
    spec = module_spec(ref, arch)
    assert spec is not None  # resolve_module only returns known refs
    kernel = flattened_kernel(info, spec, check_shapes)
    fits = info.out_features == spec.out_features and info.flat_in == spec.flat_in
    if check_shapes and not fits:
        raise FormatError(
            f"delta [{info.out_features}, {info.flat_in}] does not fit {ref} "
            f"[{spec.out_features}, {spec.flat_in}] of {arch.label}",
            "shape",
        )
    match = Match(ref, spec, adapter, keys, info, kernel)
    for part, key in dora.items():
        kh, kw = kernel or (1, 1)
        in_channels = info.flat_in // (kh * kw)
        match.dora_axis = magnitude_axis(part, shapes[key], info.out_features, in_channels)
        match.dora = key
    return match


def _side_parts(module: str, keys: dict[str, str], whole: bool) -> Leftover:
    parts = sorted(SIDE_PARTS.keys() & keys.keys())
    reason = ", ".join(SIDE_PARTS[p] for p in parts) + " — not merged"
    return Leftover(module, [keys.pop(p) for p in parts], "side", reason, whole_module=whole)


def _embeddings(keys: list[str]) -> list[Leftover]:
    """``bundle_emb.<name>.<vector>`` keys grouped by embedding name (LyCORIS pack_bundle,
    OneTrainer; A1111 ``networks.py`` loads them as textual inversions named ``<name>``)."""
    names: dict[str, list[str]] = {}
    for key in keys:
        name = key.removeprefix("bundle_emb.").split(".", 1)[0]
        names.setdefault(name, []).append(key)
    return [
        Leftover(f"bundle_emb.{n}", ks, "embedding", f"bundled embedding '{n}' (a trigger word)", n)
        for n, ks in names.items()
    ]


def plan_file(
    shapes: Mapping[str, Shape],
    arch: Architecture,
    check_shapes: bool = True,
    peft: Mapping[str, PeftConfig] | None = None,
) -> Plan:
    """Match every key group of a file against ``arch`` and classify what is left over."""
    groups, unknown = group_keys(sorted(shapes))
    plan = Plan()
    plan.leftovers += _embeddings([k for k in unknown if k.startswith("bundle_emb.")])
    plan.leftovers += [
        Leftover(k, [k], "unknown", "not a key of any LoRA format")
        for k in unknown
        if not k.startswith("bundle_emb.")
    ]
    taken: dict[ModuleRef, str] = {}
    for module, keys in groups.items():
        if SIDE_PARTS.keys() & keys.keys():
            whole = not (keys.keys() - SIDE_PARTS.keys() - {"alpha", "scale"})
            plan.leftovers.append(_side_parts(module, keys, whole))
            if whole:
                continue
        family = foreign_family(module)
        if family is not None:
            keys_ = sorted(keys.values())
            plan.leftovers.append(Leftover(module, keys_, "foreign", f"a {family} module", family))
            continue
        try:
            match = _match_group(module, keys, shapes, arch, check_shapes)
            if match.ref in taken:
                raise FormatError(f"'{taken[match.ref]}' already targets {match.ref}")
        except FormatError as exc:
            plan.leftovers.append(
                Leftover(module, sorted(keys.values()), exc.kind, str(exc), exc.algorithm)
            )
            continue
        if match.adapter.name == "peft" and not {"alpha", "scale"} & keys.keys() and peft:
            match.scale = peft_scale(peft, module, match.info.rank or 1)
        taken[match.ref] = module
        plan.matches[module] = match
    return plan


# ----------------------------------------------------------------------------- describing


def count_phrase(counter: Mapping[str, int]) -> str:
    """``{'DoRA': 3, 'OFT': 1}`` → ``'DoRA ×3, OFT ×1'``."""
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in sorted(counter.items()))


def leftover_summary(plan: Plan) -> str:
    """What will not be merged, by kind, in one line (``""`` when everything is read)."""
    parts = []
    by_kind: dict[str, list[Leftover]] = {}
    for x in plan.leftovers:
        by_kind.setdefault(x.kind, []).append(x)
    titles = {
        "foreign": "modules of another model family",
        "unsupported": "modules of an unsupported algorithm",
        "embedding": "bundled embeddings",
        "side": "side parts (bias / norm deltas) not merged",
        "shape": "modules whose shape does not fit",
        "module": "modules this architecture does not have",
        "format": "modules with inconsistent parts",
        "unknown": "keys of no LoRA format",
    }
    for kind, title in titles.items():
        items = by_kind.get(kind, [])
        if not items:
            continue
        labels = Counter(x.label for x in items if x.label)
        named = f" ({count_phrase(labels)})" if labels else ""
        parts.append(f"{len(items)} {title}{named}")
    return "; ".join(parts)


def _examples(items: list[Leftover], n: int = 2) -> str:
    return "; ".join(f"{x.module}: {x.reason}" for x in items[:n])


def refusal(
    plan: Plan, what: str, arch: Architecture, limit: float, dora_ok: bool = True
) -> str | None:
    """Why the file cannot be merged on ``arch``, or ``None``. ``what`` names the file
    (``"x.safetensors (LoRA, SD 1.x)"``). Counts are modules, never keys.

    Refused: DoRA without base weights (``dora_ok`` False); an algorithm we do not merge
    (OFT, IA3, GLoRA) in any module; a bundled
    embedding (its trigger word would stop working); a whole component (UNet or a text
    encoder) matching nothing; no module at all; or more than ``limit`` of the modules
    unmatched for any other reason.
    """
    total = plan.total_modules
    dora = [m for m in plan.matches.values() if m.dora]
    if dora and not dora_ok:
        return (
            f"{what} uses DoRA in {len(dora)} of {total} modules; DoRA needs the base model's "
            "weights to be merged, and none were given."
        )
    unsupported = plan.modules("unsupported")
    if unsupported:
        algos = Counter(x.label for x in unsupported)
        return (
            f"{what} uses {count_phrase(algos)} in {len(unsupported)} of {total} modules; "
            f"{' and '.join(sorted(algos))} {'is' if len(algos) == 1 else 'are'} not supported "
            "(this merge does not read their weights yet), so merging would lose them. "
            "Use a LoRA/LoCon/LoHa/LoKr/DoRA export of it."
        )
    embeddings = plan.modules("embedding")
    if embeddings:
        names = ", ".join(f"'{x.label}'" for x in embeddings)
        return (
            f"{what} carries bundled embedding(s) {names}, which are its trigger word(s); "
            "a merged LoRA cannot carry them yet, so they would be lost. Save the embeddings "
            "as textual inversions and merge a copy of the LoRA without them."
        )
    if not plan.matches:
        return (
            f"{what}: none of its {total} modules is a module of {arch.label} "
            f"({leftover_summary(plan)}), e.g. {_examples(plan.modules())}."
        )
    lost = _lost_components(plan)
    if lost:
        return (
            f"{what}: its {lost} would be dropped — none of its modules matches a "
            f"{arch.label} module ({leftover_summary(plan)}), e.g. {_examples(plan.modules())}."
        )
    bad = plan.modules("foreign", "shape", "module", "format", "unknown")
    if bad and len(bad) > limit * total:
        return (
            f"{what}: {len(bad)} of {total} modules cannot be merged "
            f"(limit {limit:.0%}): {leftover_summary(plan)}; e.g. {_examples(bad)}."
        )
    return None


def _lost_components(plan: Plan) -> str:
    """Components with leftover modules and no matched module, by name (``""`` if none)."""
    matched = {m.ref.component for m in plan.matches.values()}
    left = Counter(
        component_of(x.module)
        for x in plan.modules("shape", "module", "format")
        if component_of(x.module) in COMPONENT_NAMES
    )
    lost = [f"{COMPONENT_NAMES[c]} ({n} modules)" for c, n in left.items() if c not in matched]
    return " and ".join(sorted(lost))
