"""Turn a layer's raw input into rows the solver works on.

A Linear layer sees ``[..., in]``; each leading index is one token. A conv layer sees
``[B, C, H, W]``; each output position is one token whose input is the unfolded patch
``[C·kh·kw]``, flattened channel-major exactly like ``weight.reshape(out, -1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvGeometry:
    """The parts of a Conv2d that decide which input patch feeds each output pixel."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, module: torch.nn.Module) -> ConvGeometry:
        """Read the geometry of a conv module (any class with Conv2d's attributes)."""
        conv: Any = module  # Conv2d-like: its geometry attributes are ints or int pairs
        return cls(
            kernel=_pair(conv.kernel_size),
            stride=_pair(conv.stride),
            padding=_pair(conv.padding),
            dilation=_pair(conv.dilation),
        )


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def input_rows(x: torch.Tensor, conv: ConvGeometry | None) -> torch.Tensor:
    """Flatten a layer input to solver rows.

    Args:
        x: Linear input ``[..., in]`` or conv input ``[B, C, H, W]``.
        conv: geometry for a conv layer, ``None`` for a Linear layer.

    Returns:
        ``[tokens, in]`` for Linear; ``[B·L, C·kh·kw]`` for conv (L output positions).
    """
    if conv is None:
        return x.reshape(-1, x.shape[-1])
    if conv.kernel == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        # A 1×1 conv is a Linear over channels; skip unfold's copy.
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    patches = F.unfold(
        x, conv.kernel, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def token_weights_for_rows(
    weights: torch.Tensor | None, x: torch.Tensor, conv: ConvGeometry | None
) -> torch.Tensor | None:
    """Expand per-token weights ``[B, T]`` of a Linear input ``[B, T, in]`` to rows ``[B·T]``.

    Conv layers (spatial) are weighted uniformly, so ``None`` is returned for them.
    """
    if weights is None or conv is not None:
        return None
    return weights.reshape(-1)
