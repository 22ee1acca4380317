"""Which precision each step of the merge runs in, per device (see bench/README.md).

* **Statistics** (Gram sums streamed from the model, the repel sample's products with the
  base weight): fp32 on the host's device, always. They are the only ``O(tokens)`` and
  ``O(in·out)`` work, and fp32 sums of fp16/fp32 activations lose nothing the model had.
* **The factor-space problem of a layer** (``G``, ``P``, ``M`` at most ``Σr × Σr`` in the
  default subspace, the closed-form Cholesky solves, L-BFGS, the QR/SVD of the factors):
  fp64 where the device has it. The problem is small, so even a consumer GPU's 1/32–1/64
  fp64 rate keeps it a small share of a merge, and fp64 keeps the expanded attract term
  ``⟨M D G, D⟩ − 2⟨M P, D⟩ + C`` free of cancellation. Where the device has no fp64 (Apple
  MPS), it runs in fp32 on that device with a jittered Cholesky and the attract term
  measured from the closed-form start, which keeps it within the bound the tests state.

:func:`has_float64` is the one place that knows which devices lack fp64; tests replace it
to emulate such a device on the CPU.
"""

from __future__ import annotations

import torch

NO_FLOAT64 = frozenset({"mps"})
"""Device types without float64 tensors."""


def has_float64(device: torch.device | str) -> bool:
    """Whether tensors of dtype float64 can live on ``device``."""
    return torch.device(device).type not in NO_FLOAT64


def solve_dtype(device: torch.device | str) -> torch.dtype:
    """Precision of a layer's factor-space problem on ``device``."""
    return torch.float64 if has_float64(device) else torch.float32


def round_off(dtype: torch.dtype) -> float:
    """Unit round-off of ``dtype`` (machine epsilon)."""
    return float(torch.finfo(dtype).eps)
