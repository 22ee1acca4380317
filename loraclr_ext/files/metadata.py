"""The metadata a written LoRA carries, and the A1111 sidecar beside it.

Sources for the keys:

* kohya sd-scripts (``train_network.py``, ``networks/merge_lora.py``): ``ss_*`` keys,
  ``"Dynamic"`` dim/alpha when module ranks differ, ``ss_tag_frequency`` as
  ``{dataset folder: {tag: count}}``;
* Stability's ModelSpec 1.0.1: ``modelspec.*`` (architecture ids per family);
* sd-webui-additional-networks / kohya ``train_util.precalculate_safetensors_hashes``:
  ``sshs_model_hash`` and ``sshs_legacy_hash``;
* A1111 ``ui_extra_networks_lora.py`` / ``ui_edit_user_metadata.py``: the sidecar keys.

Our own recipe goes under ``loraclr_*``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from io import BytesIO

import torch
from safetensors.torch import save as save_bytes

from loraclr_ext import __version__
from loraclr_ext.errors import InvalidInputError
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef

DYNAMIC = "Dynamic"
"""``ss_network_dim``/``ss_network_alpha`` when module ranks differ (kohya's merge_lora
convention); when all ranks are equal both hold that rank."""

TagFrequency = Mapping[str, Mapping[str, int]] | str
"""One source's ``ss_tag_frequency``: the parsed map or its JSON string."""


@dataclass(frozen=True)
class ArchFacts:
    """What the metadata says about one architecture."""

    base_model_version: str  # kohya ss_base_model_version
    v2: bool  # kohya ss_v2
    modelspec_architecture: str
    implementation: str
    resolution: str
    sd_version: str  # A1111 sidecar "sd version"


ARCH_FACTS: dict[Architecture, ArchFacts] = {
    Architecture.SD1: ArchFacts(
        "sd_v1", False, "stable-diffusion-v1/lora", "diffusers", "512x512", "SD1"
    ),
    Architecture.SD2: ArchFacts(
        "sd_v2", True, "stable-diffusion-v2-512/lora", "diffusers", "512x512", "SD2"
    ),
    Architecture.SDXL: ArchFacts(
        "sdxl_base_v1-0",
        False,
        "stable-diffusion-xl-v1-base/lora",
        "https://github.com/Stability-AI/generative-models",
        "1024x1024",
        "SDXL",
    ),
}


@dataclass(frozen=True)
class LoraMetadata:
    """What a caller says about the LoRA it writes; everything else the writer derives.

    Attributes:
        title: ``modelspec.title`` (empty: the file stem).
        triggers: activation words; ``modelspec.trigger_phrase`` and the sidecar.
        sources: ``(name, sha256)`` of each merged LoRA; ``modelspec.merged_from``.
        tag_frequency: the sources' ``ss_tag_frequency`` (maps or JSON strings), merged.
        recipe: the merge recipe (prompts, strengths, settings), stored as JSON in
            ``loraclr_recipe``.
        description: ``modelspec.description`` and the sidecar description.
        extra: further str → str entries (must not collide with the writer's keys).
        date: ``modelspec.date`` (``None``: now, UTC).
    """

    title: str = ""
    triggers: Sequence[str] = ()
    sources: Sequence[tuple[str, str]] = ()
    tag_frequency: Sequence[TagFrequency] = ()
    recipe: Mapping[str, object] | None = None
    description: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)
    date: datetime | None = None


def merge_tag_frequency(sources: Sequence[TagFrequency]) -> dict:
    """Merge kohya ``ss_tag_frequency`` maps ``{dataset folder: {tag: count}}``.

    Accepts parsed maps or their JSON strings (unparseable ones are skipped); counts of a
    folder name that appears in several sources are added.
    """
    merged: dict[str, dict[str, int]] = {}
    for source in sources:
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except json.JSONDecodeError:
                continue
        if not isinstance(source, Mapping):
            continue
        for folder, tags in source.items():
            if not isinstance(tags, Mapping):
                continue
            bucket = merged.setdefault(str(folder), {})
            for tag, count in tags.items():
                if isinstance(count, int | float):
                    bucket[str(tag)] = bucket.get(str(tag), 0) + int(count)
    return merged


def addnet_hashes(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as sd-webui-additional-networks and kohya
    compute them.

    The file is serialised with only its ``ss_*`` metadata (user edits to other keys must
    not change the hash). Model hash: SHA-256 of everything after the header, i.e. the
    tensor data, which is byte-identical in the final file. Legacy hash: first 8 hex
    digits of the SHA-256 of the 64 KiB at offset 1 MiB of that serialisation.
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save_bytes(dict(state), metadata=ss_only)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(memoryview(blob)[8 + header_len :]).hexdigest()
    b = BytesIO(blob)
    b.seek(0x100000)
    legacy_hash = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def add_hashes(meta: dict[str, str], state: Mapping[str, torch.Tensor]) -> None:
    """Add the two additional-networks hashes and ``modelspec.hash_sha256`` to ``meta``."""
    model_hash, legacy_hash = addnet_hashes(state, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    meta["modelspec.hash_sha256"] = "0x" + model_hash


def _dim_string(ranks: Sequence[int]) -> str:
    return str(ranks[0]) if ranks and len(set(ranks)) == 1 else DYNAMIC


def build_metadata(
    factors: Mapping[ModuleRef, ModuleDelta],
    arch: Architecture,
    output_name: str,
    about: LoraMetadata,
) -> dict[str, str]:
    """Every metadata entry except the hashes (those need the tensors: :func:`add_hashes`).

    Raises:
        InvalidInputError: an ``about.extra`` key the writer sets itself, or a non-str
            entry.
    """
    facts = ARCH_FACTS[arch]
    ranks = [d.rank for d in factors.values() if d.rank > 0]
    conv_ranks = [d.rank for d in factors.values() if d.rank > 0 and d.kernel not in (None, (1, 1))]
    when = (about.date or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _dim_string(ranks),
        "ss_network_alpha": _dim_string(ranks),
        "ss_base_model_version": facts.base_model_version,
        "ss_v2": str(facts.v2),
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": facts.modelspec_architecture,
        "modelspec.implementation": facts.implementation,
        "modelspec.title": about.title or output_name,
        "modelspec.resolution": facts.resolution,
        "modelspec.date": when,
        "loraclr_version": __version__,
        "loraclr_sources": json.dumps([{"name": n, "sha256": h} for n, h in about.sources]),
    }
    if conv_ranks:
        conv = str(max(conv_ranks))
        meta["ss_network_args"] = json.dumps({"conv_dim": conv, "conv_alpha": conv})
    tags = merge_tag_frequency(about.tag_frequency)
    if tags:
        meta["ss_tag_frequency"] = json.dumps(tags)
    if about.sources:
        meta["modelspec.merged_from"] = ", ".join(n for n, _ in about.sources)
    if about.triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(about.triggers)
    if about.description:
        meta["modelspec.description"] = about.description
    if about.recipe is not None:
        meta["loraclr_recipe"] = json.dumps(about.recipe, sort_keys=True, default=str)
    for key, value in about.extra.items():
        if key in meta:
            raise InvalidInputError(
                f"metadata_extra key {key!r} would replace a key the writer sets."
            )
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInputError(f"metadata_extra must map str to str; got {key!r}: {value!r}.")
        meta[key] = value
    return meta


def sidecar_content(arch: Architecture, triggers: Sequence[str], description: str = "") -> dict:
    """The A1111/Forge user-metadata sidecar ``<name>.json``."""
    return {
        "description": description,
        "sd version": ARCH_FACTS[arch].sd_version,
        "activation text": ", ".join(triggers),
        "preferred weight": 1.0,
        "negative text": "",
        "notes": "",
    }
