"""How much of each LoRA's effect a method's output carries: the numbers behind the report's
fidelity, leak and bleed columns.

A method's change from the base model at some place (conditioning rows, a UNet output,
cross-attention keys and values) is written as ``a · own + b · others + rest``, where ``own``
is what the concept's own LoRA alone changes there and ``others`` what the other concepts'
LoRAs change there (applied together, or one partner). ``a`` is the concept's share (1 = all
of its effect is kept), ``b`` the others' share (0 = nothing bleeds in). Stacking gives
about (1, 1), averaging n LoRAs about (1/n, 1/n), an ideal merge (1, 0). A negative ``b``
means the method pushes *away* from the other concepts there, which the contrastive term
aims for.

The sums are accumulated (:class:`Gram`), so a measure spread over many layers never holds
more than one layer's outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Gram:
    """Inner products of ``change = out − base``, ``own`` and ``others`` (float64 sums).

    ``add`` takes the three tensors for one place (any shape, all equal) and can be called
    for as many places as make up the measure (layers, rows).
    """

    cc: float = 0.0
    co: float = 0.0
    ce: float = 0.0
    oo: float = 0.0
    ee: float = 0.0
    oe: float = 0.0

    def add(self, change: torch.Tensor, own: torch.Tensor, others: torch.Tensor) -> None:
        c, o, e = (t.double().reshape(-1) for t in (change, own, others))
        self.cc += float(c @ c)
        self.co += float(c @ o)
        self.ce += float(c @ e)
        self.oo += float(o @ o)
        self.ee += float(e @ e)
        self.oe += float(o @ e)

    def include(self, other: Gram) -> None:
        """Add another place's sums to these."""
        self.cc += other.cc
        self.co += other.co
        self.ce += other.ce
        self.oo += other.oo
        self.ee += other.ee
        self.oe += other.oe

    def relative_error(self) -> float:
        """``‖change − own‖ / ‖own‖`` = ``‖out − own_out‖ / ‖own_out − base‖``: 0 = exactly
        the concept's LoRA alone, 1 = as far from it as the base model; NaN where the LoRA
        changes nothing."""
        if self.oo <= 1e-24:
            return float("nan")
        return math.sqrt(max(self.cc - 2 * self.co + self.oo, 0.0) / self.oo)

    def shares(self) -> Shares:
        """Least-squares fit ``change ≈ a · own + b · others``.

        When ``others`` is zero or parallel to ``own`` the two cannot be told apart; then
        ``b`` is 0 and ``a`` the projection on ``own`` alone. ``own`` zero gives ``a`` NaN.
        """
        oo, ee, oe = self.oo, self.ee, self.oe
        if oo <= 1e-24:
            return Shares(float("nan"), self.ce / ee if ee > 1e-24 else float("nan"))
        det = oo * ee - oe * oe
        if ee <= 1e-24 or det <= 1e-9 * oo * ee:
            return Shares(self.co / oo, 0.0)
        return Shares((self.co * ee - self.ce * oe) / det, (self.ce * oo - self.co * oe) / det)


@dataclass(frozen=True)
class Shares:
    """Coefficients of a change on (own effect, others' effect).

    Attributes:
        own: share of the concept's own effect (1 = all of it).
        others: share of the other concepts' effect (0 = none; < 0 = pushed away).
    """

    own: float
    others: float


def relative_error(out: torch.Tensor, own: torch.Tensor, base: torch.Tensor) -> float:
    """``‖out − own‖ / ‖own − base‖`` for one place (see :meth:`Gram.relative_error`)."""
    gram = Gram()
    gram.add(out - base, own - base, torch.zeros_like(base))
    return gram.relative_error()
