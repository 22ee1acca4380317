"""Exact low-rank factorisation of deltas.

Formats whose delta is not already ``up @ down`` (LoHa, LoKr, full ``diff``) are turned
into two factors here. Only numerically-zero singular values are dropped (below
``RTOL · σ_max``), so the product equals the original delta to float64 round-off.
Work is done in float64 and returned as float32.
"""

from __future__ import annotations

import torch

RTOL = 1e-7
"""Singular values at or below ``RTOL · σ_max`` are treated as zero."""


def _split_sigma(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rtol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep singular triplets above ``rtol·σ_max``; share √σ between the factors."""
    keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    root = s[:keep].sqrt()
    up = u[:, :keep] * root
    down = root[:, None] * vh[:keep]
    return up.float().contiguous(), down.float().contiguous()


def factor_dense(weight: torch.Tensor, rtol: float = RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a dense ``[out, n]`` delta into ``up [out, k]`` and ``down [k, n]`` exactly.

    ``k`` is the numerical rank; a zero matrix gives ``k = 0``.
    """
    w = weight.reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return _split_sigma(u, s, vh, rtol)


def compress(
    up: torch.Tensor, down: torch.Tensor, rtol: float = RTOL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor ``up [out, R] @ down [R, n]`` at its numerical rank without forming it.

    Uses QR of both factors and an SVD of the small ``R×R`` core, so the cost is
    ``O((out + n)·R²)``. Falls back to a dense SVD when ``R ≥ min(out, n)``.
    """
    out, r = up.shape
    n = down.shape[1]
    if r >= min(out, n):
        return factor_dense(up.double() @ down.double(), rtol)
    q_up, r_up = torch.linalg.qr(up.double())
    q_dn, r_dn = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_dn.T, full_matrices=False)
    small_up, small_down = _split_sigma(u, s, vh, rtol)
    return (
        (q_up @ small_up.double()).float().contiguous(),
        (small_down.double() @ q_dn.T).float().contiguous(),
    )


def khatri_rao_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: ``[m, p]`` and ``[m, q]`` → ``[m, p·q]``.

    Used for the Hadamard product of two low-rank matrices:
    ``(A1 B1) ∘ (A2 B2) = khatri_rao_rows(A1, A2) @ khatri_rao_rows(B1.T, B2.T).T``.
    """
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def pad_rank(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append zero columns to ``up [out, r]`` and zero rows to ``down [r, n]`` up to ``rank``.

    The product is unchanged. Writing every module at one rank (with ``alpha = rank``)
    keeps loaders that derive one default alpha for the whole file exact: diffusers, for
    one, ignores the per-module alphas of cross-attention K/V in kohya files.
    """
    extra = rank - up.shape[1]
    if extra <= 0:
        return up, down
    up = torch.cat([up, up.new_zeros(up.shape[0], extra)], dim=1)
    down = torch.cat([down, down.new_zeros(extra, down.shape[1])])
    return up, down
