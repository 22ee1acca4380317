"""DoRA: bake a weight-decomposed LoRA into the dense delta the WebUIs apply, then a LoRA.

DoRA rescales the LoRA-updated weight to a trained magnitude, so its change to a module
depends on the base weight ``W`` and is full-rank in general. Formulas (notes §4.2;
A1111 ``extensions-builtin/Lora/network.py apply_weight_decompose``, Forge
``backend/patcher/lora.py`` / ComfyUI ``comfy/weight_adapter/base.py weight_decompose``):

* magnitude per **input** channel (LyCORIS ≤ 3.1 ``dora_scale [1, in(,1,1)]``,
  ``wd_on_output=False``; OneTrainer default): ``N = ‖W + ΔW‖`` over (out, kh, kw) for each
  input channel; A1111 and Forge agree.
* magnitude per **output** row (LyCORIS ≥ 3.2 ``wd_on_out`` ``[out, 1(,1,1)]``, PEFT
  ``lora_magnitude_vector [out]`` / ``[1, out, 1, 1]``): Forge/ComfyUI normalise by the
  row norm of the **base** weight ``N = ‖W‖`` (as coded there; A1111 1.10 has no branch for
  this axis and mis-broadcasts). We follow Forge, the WebUI that applies this layout.

Both: ``W' = (W + ΔW) · m / (N + eps)`` and the applied change at strength ``s`` is
``s · (W' − W)``, linear in ``s`` — so the baked delta ``W' − W`` takes strengths like any
LoRA. It is factored exactly (SVD, numerically-zero singular values dropped): typically
full rank, because the magnitude rescales the base weight too. Reducing it to the merged
file's rank is the merge's job, which reports the energy each layer keeps.
"""

from __future__ import annotations

import torch

from loraclr_ext.files.formats import FormatError, Shape
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.lowrank import factor_dense

DORA_PARTS = ("dora_scale", "lora_magnitude_vector")


def magnitude_axis(part: str, shape: Shape, out: int, in_channels: int) -> str:
    """``"out"`` or ``"in"``: which axis a magnitude normalises.

    PEFT's ``lora_magnitude_vector`` is always per output (``[out]``, conv ``[1, out, 1, 1]``).
    kohya/LyCORIS ``dora_scale`` says it by which dimension is 1: ``[out, 1(,1,1)]`` per
    output, ``[1, in(,1,1)]`` per input. Raises FormatError when the sizes do not fit.
    """
    dims = [int(d) for d in shape]
    if part == "lora_magnitude_vector":
        axis, n = "out", max(dims) if dims else 0
        if [d for d in dims if d != 1] not in ([out], []) or n != out:
            raise FormatError(f"DoRA magnitude {dims} does not fit out={out}", "shape")
        return axis
    if len(dims) >= 2 and dims[0] == out and all(d == 1 for d in dims[1:]):
        return "out"
    if len(dims) >= 2 and dims[0] == 1 and dims[1] == in_channels and all(d == 1 for d in dims[2:]):
        return "in"
    raise FormatError(
        f"dora_scale {dims} fits neither [out={out}, 1] nor [1, in={in_channels}]", "shape"
    )


def dora_dense(
    weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    axis: str,
    kernel: tuple[int, int] | None,
) -> torch.Tensor:
    """``W' − W`` for base ``weight`` and LoRA ``delta`` (both ``[out, in·kh·kw]``, scale
    folded in), in float64.

    ``magnitude``: the trained norms (any of the layouts in :func:`magnitude_axis`).
    """
    w, d = weight.double(), delta.double()
    out = w.shape[0]
    k = kernel[0] * kernel[1] if kernel else 1
    updated = w + d
    eps = torch.finfo(torch.float32).eps
    m = magnitude.double().reshape(-1)
    if axis == "out":
        norm = w.norm(dim=1) + eps  # Forge / ComfyUI: the base weight's row norm
        baked = updated * (m / norm)[:, None]
    else:
        per_in = updated.reshape(out, -1, k)
        norm = per_in.transpose(0, 1).reshape(per_in.shape[1], -1).norm(dim=1) + eps
        baked = (per_in * (m / norm)[None, :, None]).reshape(out, -1)
    return baked - w


def bake(
    delta: ModuleDelta, weight: torch.Tensor, magnitude: torch.Tensor, axis: str
) -> ModuleDelta:
    """The exact LoRA of a DoRA module's applied change (see the module doc).

    Shapes: ``weight`` ``[out, in·kh·kw]`` like ``delta.dense()``; ``magnitude`` as read.
    """
    if tuple(weight.shape) != (delta.out_features, delta.in_features):
        raise FormatError(
            f"base weight {list(weight.shape)} does not fit the delta "
            f"[{delta.out_features}, {delta.in_features}]",
            "shape",
        )
    dense = dora_dense(weight, delta.dense(), magnitude, axis, delta.kernel)
    up, down = factor_dense(dense)
    return ModuleDelta(up, down, delta.kernel)
