"""Which Forge-family weights the merge can read, and reading them: packed storage
(bitsandbytes nf4/fp4, GGUF, integers) is refused before anything runs; fp8 storage is
read as fp32 times the layer's ``scale_weight`` (dossier forge.md §2.4)."""

from __future__ import annotations

import torch

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.hosts.weights import to_cpu_float, weight_of


def quantised_storage(tensor: torch.Tensor) -> str | None:
    """What kind of packed storage ``tensor`` uses, or ``None`` for plain float storage.

    fp8 counts as plain: it converts to fp32 exactly (times ``scale_weight`` where set).
    bitsandbytes nf4/fp4 (``bnb_quantized``) and GGUF (``gguf_cls``) pack several weights
    per byte; their tensors do not even have the layer's shape.
    """
    if getattr(tensor, "bnb_quantized", False) or type(tensor).__name__ == "Params4bit":
        return "nf4/fp4 (bitsandbytes)"
    if getattr(tensor, "gguf_cls", None) is not None or type(tensor).__name__ == "ParameterGGUF":
        return "GGUF"
    if not tensor.is_floating_point():
        return f"integer ({tensor.dtype})"
    return None


def check_storage(models: dict[str, torch.nn.Module]) -> None:
    """Refuse quantised checkpoints before anything runs.

    Raises:
        InvalidInputError: a weight is nf4/fp4, GGUF or integer-packed.
    """
    for label, model in models.items():
        for name, param in model.named_parameters():
            kind = quantised_storage(param)
            if kind is not None:
                raise InvalidInputError(
                    f"The loaded checkpoint stores its {label} weights as {kind} "
                    f"(e.g. {name}); the merge needs unpacked base weights. Load an "
                    "fp16/bf16/fp8 checkpoint, or set 'Diffusion in Low Bits' to "
                    "Automatic, and try again."
                )


def float_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as CPU fp32 ``[out, in·kh·kw]``, fp8 storage dequantised with
    the module's ``scale_weight`` (scalar or per output) where it has one."""
    weight = weight_of(module)
    kind = quantised_storage(weight)
    if kind is not None:
        raise InvalidInputError(f"A weight is stored as {kind}; cannot read it.")
    w = to_cpu_float(weight)
    scale = getattr(module, "scale_weight", None)
    if isinstance(scale, torch.Tensor):
        s = to_cpu_float(scale)
        if s.numel() == 1:
            w = w * s.reshape(())
        elif s.numel() == w.shape[0]:
            w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
        else:
            raise InvalidInputError(
                f"Unexpected scale_weight of shape {tuple(s.shape)} for a weight of shape "
                f"{tuple(w.shape)}."
            )
    return w.reshape(w.shape[0], -1).clone()
