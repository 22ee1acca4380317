"""Device and dtype choice for a merge run (``--device auto|cpu|cuda[:N]|mps``)."""

from __future__ import annotations

import torch

from loraclr_ext.errors import InvalidInputError

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU; ``'cpu'``, ``'cuda'``, ``'cuda:N'``, ``'mps'``.

    Raises:
        InvalidInputError: unknown device string, or an accelerator that is not available.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(
            f"Unknown device '{device}'; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"Device '{device}' was requested but this PyTorch build sees no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"Device '{device}' does not exist: {torch.cuda.device_count()} CUDA GPU(s)."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInputError(f"Device '{device}' was requested but MPS is not available.")
    elif dev.type != "cpu":
        raise InvalidInputError(f"Unsupported device '{device}'; use 'auto', 'cpu' or 'cuda'.")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None`` -> fp16 on an accelerator, fp32 on the CPU (fp16 matmuls are slow there)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise InvalidInputError(
            f"Unknown dtype '{dtype}'; use one of {', '.join(sorted(_DTYPES))}."
        ) from None
