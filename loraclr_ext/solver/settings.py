"""Solver settings: which objective, its hyper-parameters, and how hard to refine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from loraclr_ext.errors import InvalidInputError

Objective = Literal["loraclr", "official", "least_squares"]


@dataclass(frozen=True)
class SolverSettings:
    """Hyper-parameters of the per-layer merge.

    Objectives (``X_i`` concept i's inputs, ``Y_i = (W0+ΔW_i)X_i`` its targets,
    ``Ŷ_i = (W0+Δ)X_i`` the merged outputs, ``N`` concepts, norms Frobenius):

    * ``"loraclr"`` — the paper: ``(1/N) Σ_i [‖Ŷ_i − Y_i‖² + μ·max(0, m − d_i⁻)²] + λ‖Δ‖``
      with ``d_i⁻ = min_{j≠i} ‖Y_i − Ŷ_j‖`` (target of i against merged output on j).
    * ``"official"`` — the released code's variant: distances ``‖Ŷ_i − Y_j‖`` (merged i
      against target j), hardest negative per row, plus ``λ_mse · MSE`` (mean over all
      output elements of all concepts) and ``λ_reg‖Δ‖``; μ = 1.
    * ``"least_squares"`` — Mix-of-Show: ``Σ_i ‖Ŷ_i − Y_i‖²`` only (minimum-norm solution).

    Attributes:
        objective: one of the above.
        margin: ``m``, in the units of ``distance`` (output activations).
        repel: ``μ``, weight of the hinge term (``"loraclr"`` only).
        reg: ``λ`` (``λ_reg``), weight of ``‖Δ‖`` (not squared), per unit of weight norm.
        mse: ``λ_mse`` (``"official"`` only).
        distance: ``"sum"`` — Euclidean norm over all rows, as the paper and code do (with
            thousands of rows the margin is rarely reached); ``"rms"`` (``"loraclr"`` only) —
            root mean square per output element, and the attract term becomes each concept's
            mean squared error per element, so ``margin`` is in activation units and both
            terms keep their balance whatever the row count.
        preserve: ``ν``, weight of ``‖Δ X_0‖²`` on neutral inputs (0 = off).
        ridge: relative Tikhonov floor ``ε·tr(G)/d`` that keeps the closed form defined when
            the statistics are rank-deficient; not part of the objective's value.
        iterations: L-BFGS iterations of the refinement when the repel term is active.
        rank: target rank of the output (``None`` = exact, rank ≤ Σ ranks).
    """

    objective: Objective = "loraclr"
    margin: float = 0.5
    repel: float = 1.0
    reg: float = 1e-3
    mse: float = 0.1
    distance: Literal["sum", "rms"] = "sum"
    preserve: float = 0.0
    ridge: float = 1e-6
    iterations: int = 30
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.objective not in ("loraclr", "official", "least_squares"):
            raise InvalidInputError(f"Unknown objective {self.objective!r}.")
        if self.distance not in ("sum", "rms"):
            raise InvalidInputError(f"distance must be 'sum' or 'rms', got {self.distance!r}.")
        for name in ("margin", "repel", "reg", "mse", "preserve", "ridge"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be ≥ 0, got {getattr(self, name)}.")
        if self.iterations < 0:
            raise InvalidInputError(f"iterations must be ≥ 0, got {self.iterations}.")
        if self.rank is not None and self.rank < 1:
            raise InvalidInputError(f"rank must be ≥ 1 or None, got {self.rank}.")

    @property
    def has_repel(self) -> bool:
        return self.objective != "least_squares" and self.repel > 0 and self.margin > 0


OFFICIAL_DEFAULTS = SolverSettings(objective="official", margin=0.5, reg=1e-3, mse=0.1)
"""The released LoRACLR code's hyper-parameters (lr 1e-4 and 50 AdamW steps are the
baseline optimiser's, see ``baselines.official_recipe``)."""
