"""LyCORIS LoHa (``hada_*``) and LoKr (``lokr_*``), read the way A1111 applies them.

LoHa:  ΔW = (w1a @ w1b) ∘ (w2a @ w2b) · alpha / r, r = ``hada_w1_b.shape[0]``;
       with Tucker cores ``hada_t1``/``hada_t2`` [r, r, kh, kw], ``w?a`` is [r, out] and
       ``w?b`` is [r, in] and ``W? = Σ t[p, q] · w?a[p] ⊗ w?b[q]``.
LoKr:  ΔW = kron(w1, w2) · alpha / r, ``w1 = lokr_w1`` or ``w1_a @ w1_b``, ``w2`` likewise
       (optionally with Tucker core ``lokr_t2``); r = rank of the factored one
       (w1 first), scale 1 when both are full.
Both are re-factored exactly (only numerically-zero singular values dropped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from loraclr_ext.files.formats.base import (
    FormatError,
    Shape,
    ShapeInfo,
    alpha_scale,
    kernel_of,
    require,
)
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.lowrank import compress, factor_dense, khatri_rao_rows


def _prod(dims: Shape) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``[out, in, kh, kw]`` from core ``t [p, q, kh, kw]``, ``wa [p, out]``, ``wb [q, in]``."""
    return torch.einsum("pqkl,po,qi->oikl", t.double(), wa.double(), wb.double())


class LoHa:
    """LyCORIS LoHa (Hadamard product of two low-rank matrices)."""

    name: ClassVar[str] = "loha"
    parts: ClassVar[frozenset[str]] = frozenset(
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
    )
    _needed = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def shape_info(self, shapes: Mapping[str, Shape]) -> ShapeInfo:
        require(shapes, *self._needed)
        w1a, w1b = shapes["hada_w1_a"], shapes["hada_w1_b"]
        rank = int(w1b[0])
        if "hada_t1" in shapes:
            t1 = shapes["hada_t1"]
            kernel = kernel_of(t1)
            return ShapeInfo(int(w1a[1]), int(w1b[1]) * _prod(t1[2:]), kernel, rank)
        return ShapeInfo(int(w1a[0]), _prod(w1b[1:]), kernel_of(w1b), rank)

    def build(self, tensors: Mapping[str, torch.Tensor]) -> tuple[ModuleDelta, str]:
        require(tensors, *self._needed)
        info = self.shape_info({k: tuple(v.shape) for k, v in tensors.items()})
        scale = alpha_scale(tensors, info.rank)
        w1a, w1b = tensors["hada_w1_a"], tensors["hada_w1_b"]
        w2a, w2b = tensors["hada_w2_a"], tensors["hada_w2_b"]
        if "hada_t1" in tensors or "hada_t2" in tensors:
            require(tensors, "hada_t1", "hada_t2")
            dense = _tucker(tensors["hada_t1"], w1a, w1b) * _tucker(tensors["hada_t2"], w2a, w2b)
            up, down = factor_dense(dense * scale)
        else:
            # (A1 B1) ∘ (A2 B2) = KR(A1, A2) @ KR(B1ᵀ, B2ᵀ)ᵀ: exact, rank r1·r2, then compressed.
            a1, a2 = w1a.double().reshape(w1a.shape[0], -1), w2a.double().reshape(w2a.shape[0], -1)
            b1 = w1b.double().reshape(w1b.shape[0], -1)
            b2 = w2b.double().reshape(w2b.shape[0], -1)
            if a1.shape[0] != a2.shape[0] or b1.shape[1] != b2.shape[1]:
                raise FormatError("hada_w1 and hada_w2 have different shapes")
            up, down = compress(khatri_rao_rows(a1, a2), khatri_rao_rows(b1.T, b2.T).T * scale)
        return ModuleDelta(up=up, down=down, kernel=info.kernel), "loha"


def _lokr_factor(
    tensors: Mapping[str, torch.Tensor], n: int
) -> tuple[torch.Tensor, torch.Tensor, int | None, tuple[int, int] | None]:
    """Exact factors ``(U, V)`` of ``w{n}`` flattened to 2-D, its nominal rank and kernel."""
    full, a, b, t = f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b", f"lokr_t{n}"
    if full in tensors:
        w = tensors[full]
        u, v = factor_dense(w)
        return u.double(), v.double(), None, kernel_of(tuple(w.shape))
    require(tensors, a, b)
    wa, wb = tensors[a], tensors[b]
    if t in tensors:
        w = _tucker(tensors[t], wa, wb)
        u, v = factor_dense(w)
        return u.double(), v.double(), int(wb.shape[0]), kernel_of(tuple(w.shape))
    wa2 = wa.double().reshape(wa.shape[0], -1)
    return wa2, wb.double().reshape(wb.shape[0], -1), int(wb.shape[0]), kernel_of(tuple(wb.shape))


class LoKr:
    """LyCORIS LoKr (Kronecker product)."""

    name: ClassVar[str] = "lokr"
    parts: ClassVar[frozenset[str]] = frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    )

    @staticmethod
    def _side(shapes: Mapping[str, Shape], n: int) -> tuple[int, int, int | None, Shape]:
        """(out, in, nominal rank, kernel dims) of ``w{n}`` from shapes."""
        if f"lokr_w{n}" in shapes:
            s = shapes[f"lokr_w{n}"]
            return int(s[0]), int(s[1]), None, tuple(s[2:])
        require(shapes, f"lokr_w{n}_a", f"lokr_w{n}_b")
        a, b = shapes[f"lokr_w{n}_a"], shapes[f"lokr_w{n}_b"]
        if f"lokr_t{n}" in shapes:
            return int(a[1]), int(b[1]), int(b[0]), tuple(shapes[f"lokr_t{n}"][2:])
        return int(a[0]), int(b[1]), int(b[0]), tuple(b[2:])

    def shape_info(self, shapes: Mapping[str, Shape]) -> ShapeInfo:
        o1, i1, r1, k1 = self._side(shapes, 1)
        o2, i2, r2, k2 = self._side(shapes, 2)
        if k1:
            raise FormatError("a 4-D lokr_w1 is not supported")
        kernel = (int(k2[0]), int(k2[1])) if len(k2) == 2 else None
        return ShapeInfo(o1 * o2, i1 * i2 * _prod(k2), kernel, r1 if r1 is not None else r2)

    def build(self, tensors: Mapping[str, torch.Tensor]) -> tuple[ModuleDelta, str]:
        info = self.shape_info({k: tuple(v.shape) for k, v in tensors.items()})
        u1, v1, _, _ = _lokr_factor(tensors, 1)
        u2, v2, _, _ = _lokr_factor(tensors, 2)
        scale = alpha_scale(tensors, info.rank)
        # kron(U1 V1, U2 V2) = kron(U1, U2) @ kron(V1, V2); w2's flattened kernel stays
        # innermost, which is exactly the [out, in·kh·kw] order of the conv delta.
        up, down = compress(torch.kron(u1, u2), torch.kron(v1, v2) * scale)
        return ModuleDelta(up=up, down=down, kernel=info.kernel), "lokr"
