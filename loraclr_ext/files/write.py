"""Pack merged factors as a kohya LoRA that every WebUI and diffusers can load.

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

The neighbours hold the rest: :mod:`~loraclr_ext.files.names` (output name and sidecar
path), :mod:`~loraclr_ext.files.metadata` (``ss_*``/``modelspec.*`` entries, hashes, the
sidecar's content) and :mod:`~loraclr_ext.files.publish` (temporary file, atomic rename,
no-clobber). Nothing is ever left half-written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.files import publish
from loraclr_ext.files.metadata import LoraMetadata, add_hashes, build_metadata, sidecar_content
from loraclr_ext.files.names import check_output_path, sidecar_path
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.naming import ModuleSpec, kohya_name, module_spec
from loraclr_ext.model.targets import ModuleRef

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


# ----------------------------------------------------------------------------- file


def write_lora(
    path: str | Path,
    factors: Mapping[ModuleRef, ModuleDelta],
    arch: Architecture,
    about: LoraMetadata | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    sidecar: bool = True,
    check_shapes: bool = True,
) -> Path:
    """Write ``factors`` as a kohya LoRA at ``path`` (``.safetensors``) plus its sidecar.

    Args:
        path: output file; its directory must exist.
        factors: exact deltas per module (scale and strength already folded in).
        arch: base-model architecture (names, metadata).
        about: title, triggers, sources, tag frequency, recipe, description, extra
            entries (see :class:`~loraclr_ext.files.metadata.LoraMetadata`); ``None``
            for none of them.
        dtype: tensor dtype in the file.
        overwrite: replace an existing file (and sidecar).
        sidecar: also write ``<stem>.json``.
        check_shapes: require the real model's module sizes (``False`` for tiny models).

    Returns:
        The written path.

    Raises:
        InvalidInputError: bad suffix, missing directory, bad deltas or dtype.
        OutputExistsError: the file or its sidecar exists and ``overwrite`` is False.
    """
    about = about or LoraMetadata()
    final = check_output_path(path)
    side = sidecar_path(final)
    publish.refuse_existing([final, side] if sidecar else [final], overwrite)

    state = build_state_dict(factors, arch, dtype, check_shapes=check_shapes)
    meta = build_metadata(factors, arch, final.stem, about)
    add_hashes(meta, state)

    temps: list[Path] = []
    published: list[Path] = []
    try:
        tmp = publish.temp_path(final)
        temps.append(tmp)
        save_file(state, str(tmp), metadata=meta)
        side_tmp = (
            publish.write_temp_json(side, sidecar_content(arch, about.triggers, about.description))
            if sidecar
            else None
        )
        if side_tmp is not None:
            temps.append(side_tmp)
        publish.publish(tmp, final, overwrite)
        published.append(final)
        if side_tmp is not None:
            publish.publish(side_tmp, side, overwrite)
    except BaseException:
        if not overwrite:  # we created these; an overwrite already replaced the old file
            for done in published:
                done.unlink(missing_ok=True)
        raise
    finally:
        for tmp_path in temps:
            tmp_path.unlink(missing_ok=True)
    return final
