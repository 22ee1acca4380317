"""Write merged factors as a kohya LoRA that every WebUI and diffusers can load.

Layout of the file (what :func:`write_lora` produces):

* keys ``<kohya name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` for every module
  (names from :func:`loraclr_ext.model.naming.kohya_name`: diffusers-style UNet names for
  SD1/SD2, ldm/SGM names for SDXL; ``lora_te_`` for SD1/SD2, ``lora_te1_``/``lora_te2_``
  for SDXL);
* ``alpha = rank`` everywhere, so loaders apply scale 1 — the factors already carry every
  scale and strength;
* Linear: down ``[r, in]``, up ``[out, r]``; conv: down ``[r, in, kh, kw]``,
  up ``[out, r, 1, 1]``; 1×1 convs (SD1 ``proj_in``/``proj_out``, ``conv_shortcut``) are
  written 4-D even when the delta arrives in Linear form, because loaders build the LoRA
  module from the base module's type;
* fp16 by default (bf16/fp32 on request), contiguous.

Metadata follows kohya (``ss_*``), ModelSpec 1.0.1 (``modelspec.*``) and the
sd-webui-additional-networks hashes; our recipe goes under ``loraclr_*``. A sidecar
``<name>.json`` gives A1111/Forge the activation text and preferred weight.

Nothing is ever left half-written: the file is written to a temporary name in the output
directory and renamed; an existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from loraclr_ext import __version__
from loraclr_ext.errors import InvalidInputError, OutputExistsError
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.naming import ModuleSpec, kohya_name, module_spec
from loraclr_ext.model.targets import ModuleRef

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DYNAMIC = "Dynamic"
"""``ss_network_dim``/``ss_network_alpha`` when module ranks differ (kohya's merge_lora
convention); when all ranks are equal both hold that rank."""


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

_RESERVED_CHARS = set('<>:"|?*')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)
}
MAX_NAME_LENGTH = 200


# ----------------------------------------------------------------------------- names


def validate_output_name(name: str) -> str:
    """Check a user-chosen output name; return it without a ``.safetensors`` suffix.

    Raises:
        InvalidInputError: empty, a path (separators or ``..``), reserved or control
            characters, a Windows device name, a trailing dot/space, or too long.
    """
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name

    def bad(reason: str) -> InvalidInputError:
        return InvalidInputError(f"Output name {name!r} is not allowed: {reason}.")

    if not stem.strip():
        raise bad("it is empty; type a file name such as 'alice_and_bob'")
    if "/" in stem or "\\" in stem:
        raise bad("it contains a path separator; give a plain file name")
    if ".." in stem or stem == ".":
        raise bad("it contains '..'; give a plain file name")
    found = sorted(_RESERVED_CHARS & set(stem))
    if found:
        raise bad(f"it contains {' '.join(found)}; these are reserved in file names")
    if any(ord(c) < 32 or ord(c) == 127 for c in stem):
        raise bad("it contains control characters")
    if stem.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        raise bad("it is a reserved device name on Windows")
    if stem != stem.rstrip(". ") or stem != stem.lstrip():
        raise bad("it starts with a space or ends with a dot or space")
    if len(stem) > MAX_NAME_LENGTH:
        raise bad(f"it is longer than {MAX_NAME_LENGTH} characters")
    return stem


# ----------------------------------------------------------------------------- tensors


def _kernel_for(ref: ModuleRef, delta: ModuleDelta, spec: ModuleSpec) -> tuple[int, int] | None:
    """The kernel to write: the base module's own, 1×1 conv and Linear being interchangeable."""
    linear_like = (None, (1, 1))
    if delta.kernel in linear_like and spec.kernel in linear_like:
        return spec.kernel
    if delta.kernel != spec.kernel:
        raise InvalidInputError(
            f"Delta for {ref} has kernel {delta.kernel}, but the module's kernel is {spec.kernel}."
        )
    return spec.kernel


def _check_delta(
    ref: ModuleRef, delta: ModuleDelta, arch: Architecture, check_shapes: bool
) -> ModuleSpec:
    spec = module_spec(ref, arch)
    if spec is None:
        raise InvalidInputError(f"{ref} is not a module of a {arch.label} model.")
    wrong = delta.out_features != spec.out_features or delta.in_features != spec.flat_in
    if check_shapes and wrong:
        raise InvalidInputError(
            f"Delta for {ref} is [{delta.out_features}, {delta.in_features}] but the "
            f"{arch.label} module needs [{spec.out_features}, {spec.flat_in}]."
        )
    if not (torch.isfinite(delta.up).all() and torch.isfinite(delta.down).all()):
        raise InvalidInputError(f"Delta for {ref} contains NaN or Inf; nothing was written.")
    return spec


def _balanced(delta: ModuleDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` in fp32 with equal Frobenius norms, so neither factor under- or
    overflows when cast to fp16 (the product is unchanged)."""
    up, down = delta.up.float(), delta.down.float()
    n_up, n_down = up.norm(), down.norm()
    if n_up > 0 and n_down > 0:
        c = (n_down / n_up).sqrt()
        up, down = up * c, down / c
    return up, down


def build_state_dict(
    factors: Mapping[ModuleRef, ModuleDelta],
    arch: Architecture,
    dtype: torch.dtype = torch.float16,
    *,
    check_shapes: bool = True,
) -> dict[str, torch.Tensor]:
    """kohya tensors for every module with rank > 0 (rank-0 deltas change nothing and are
    skipped: several loaders cannot build a rank-0 layer).

    ``check_shapes=False`` accepts deltas whose sizes differ from the real model's
    (miniature test models keep the module names but not the sizes)."""
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidInputError(
            f"dtype {dtype} is not supported; use float16, bfloat16 or float32."
        )
    state: dict[str, torch.Tensor] = {}
    for ref in sorted(factors):
        delta = factors[ref]
        spec = _check_delta(ref, delta, arch, check_shapes)
        if delta.rank == 0:
            continue
        kernel = _kernel_for(ref, delta, spec)
        up, down = _balanced(delta)
        if kernel is not None:
            down = down.reshape(delta.rank, -1, *kernel)
            up = up.reshape(delta.out_features, delta.rank, 1, 1)
        name = kohya_name(ref, arch)
        up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise InvalidInputError(
                f"Delta for {ref} overflows {dtype}; write with dtype bfloat16 or float32."
            )
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(float(delta.rank), dtype=dtype)
    if not state:
        raise InvalidInputError("There is nothing to write: every delta has rank 0.")
    return state


# ----------------------------------------------------------------------------- metadata


def merge_tag_frequency(sources: Sequence[Mapping[str, Mapping[str, int]] | str]) -> dict:
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


def _dim_string(ranks: Sequence[int]) -> str:
    return str(ranks[0]) if ranks and len(set(ranks)) == 1 else DYNAMIC


def build_metadata(
    factors: Mapping[ModuleRef, ModuleDelta],
    arch: Architecture,
    *,
    output_name: str,
    title: str,
    triggers: Sequence[str] = (),
    sources: Sequence[tuple[str, str]] = (),
    tag_frequency: Sequence[Mapping[str, Mapping[str, int]] | str] = (),
    recipe: Mapping[str, object] | None = None,
    description: str = "",
    metadata_extra: Mapping[str, str] | None = None,
    date: datetime | None = None,
) -> dict[str, str]:
    """Every metadata entry except the two hashes (those need the tensors)."""
    facts = ARCH_FACTS[arch]
    ranks = [d.rank for d in factors.values() if d.rank > 0]
    conv_ranks = [d.rank for d in factors.values() if d.rank > 0 and d.kernel not in (None, (1, 1))]
    when = (date or datetime.now(timezone.utc)).isoformat(timespec="seconds")
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
        "modelspec.title": title or output_name,
        "modelspec.resolution": facts.resolution,
        "modelspec.date": when,
        "loraclr_version": __version__,
        "loraclr_sources": json.dumps([{"name": n, "sha256": h} for n, h in sources]),
    }
    if conv_ranks:
        conv = str(max(conv_ranks))
        meta["ss_network_args"] = json.dumps({"conv_dim": conv, "conv_alpha": conv})
    tags = merge_tag_frequency(tag_frequency)
    if tags:
        meta["ss_tag_frequency"] = json.dumps(tags)
    if sources:
        meta["modelspec.merged_from"] = ", ".join(n for n, _ in sources)
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    if description:
        meta["modelspec.description"] = description
    if recipe is not None:
        meta["loraclr_recipe"] = json.dumps(recipe, sort_keys=True, default=str)
    for key, value in (metadata_extra or {}).items():
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


# ----------------------------------------------------------------------------- files


def _temp_path(final: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``final`` atomically; without ``overwrite`` never replace a file.

    A hard link fails if ``final`` exists, which closes the gap between checking and
    renaming; file systems without hard links fall back to check-then-rename. The file
    gets the permissions a plainly created one would: ``mkstemp`` and safetensors leave
    it owner-only, which hides the LoRA from a WebUI or a share running as another user.
    """
    os.chmod(tmp, 0o666 & ~_umask())
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise OutputExistsError(_exists_message(final)) from None
    except OSError:
        if final.exists():
            raise OutputExistsError(_exists_message(final)) from None
        os.replace(tmp, final)
        return
    tmp.unlink()


def _exists_message(path: Path) -> str:
    return f"{path} already exists; choose another output name or allow overwriting."


def _write_temp_json(final: Path, content: dict) -> Path:
    tmp = _temp_path(final)
    tmp.write_text(json.dumps(content, indent=4, ensure_ascii=False), encoding="utf-8")
    return tmp


def write_lora(
    path: str | Path,
    factors: Mapping[ModuleRef, ModuleDelta],
    arch: Architecture,
    *,
    dtype: torch.dtype = torch.float16,
    title: str = "",
    triggers: Sequence[str] = (),
    sources: Sequence[tuple[str, str]] = (),
    tag_frequency: Sequence[Mapping[str, Mapping[str, int]] | str] = (),
    recipe: Mapping[str, object] | None = None,
    description: str = "",
    metadata_extra: Mapping[str, str] | None = None,
    overwrite: bool = False,
    sidecar: bool = True,
    check_shapes: bool = True,
) -> Path:
    """Write ``factors`` as a kohya LoRA at ``path`` (``.safetensors``) plus its sidecar.

    Args:
        path: output file; its directory must exist.
        factors: exact deltas per module (scale and strength already folded in).
        arch: base-model architecture (names, metadata).
        dtype: tensor dtype in the file.
        title: ``modelspec.title`` (defaults to the file stem).
        triggers: activation words; ``modelspec.trigger_phrase`` and the sidecar.
        sources: ``(name, sha256)`` of each merged LoRA; ``modelspec.merged_from``.
        tag_frequency: the sources' ``ss_tag_frequency`` (maps or JSON strings), merged.
        recipe: the merge recipe (prompts, strengths, settings), stored as JSON in
            ``loraclr_recipe``.
        description: ``modelspec.description`` and the sidecar description.
        metadata_extra: further str → str entries (must not collide with ours).
        overwrite: replace an existing file (and sidecar).
        sidecar: also write ``<stem>.json``.
        check_shapes: require the real model's module sizes (``False`` for tiny models).

    Returns:
        The written path.

    Raises:
        InvalidInputError: bad suffix, missing directory, bad deltas or dtype.
        OutputExistsError: the file or its sidecar exists and ``overwrite`` is False.
    """
    final = Path(path)
    if final.suffix.lower() != ".safetensors":
        raise InvalidInputError(f"{final} must end in .safetensors.")
    if not final.parent.is_dir():
        raise InvalidInputError(f"Output directory {final.parent} does not exist; create it first.")
    side = final.with_suffix(".json")
    targets = [final, side] if sidecar else [final]
    for target in targets:
        if target.exists() and not overwrite:
            raise OutputExistsError(_exists_message(target))

    state = build_state_dict(factors, arch, dtype, check_shapes=check_shapes)
    meta = build_metadata(
        factors,
        arch,
        output_name=final.stem,
        title=title,
        triggers=triggers,
        sources=sources,
        tag_frequency=tag_frequency,
        recipe=recipe,
        description=description,
        metadata_extra=metadata_extra,
    )
    model_hash, legacy_hash = addnet_hashes(state, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    meta["modelspec.hash_sha256"] = "0x" + model_hash

    temps: list[Path] = []
    published: list[Path] = []
    try:
        tmp = _temp_path(final)
        temps.append(tmp)
        save_file(state, str(tmp), metadata=meta)
        side_tmp = (
            _write_temp_json(side, sidecar_content(arch, triggers, description))
            if sidecar
            else None
        )
        if side_tmp is not None:
            temps.append(side_tmp)
        _publish(tmp, final, overwrite)
        published.append(final)
        if side_tmp is not None:
            _publish(side_tmp, side, overwrite)
    except BaseException:
        if not overwrite:  # we created these; an overwrite already replaced the old file
            for done in published:
                done.unlink(missing_ok=True)
        raise
    finally:
        for tmp_path in temps:
            tmp_path.unlink(missing_ok=True)
    return final
