"""The merge objective of one layer, evaluated in factor space from statistics.

The merged delta is ``Δ = U D`` (``B`` omitted when no basis) with ``U = [up_1 … up_n]``
``[out, R]`` fixed and ``D`` ``[R, d]`` the unknown. With ``M = UᵀU``, ``G`` the weighted
Gram of all concepts' inputs and ``P = [P_1; …; P_n]`` (``P_i = down_i G_i``):

    Σ_i ‖(Δ − ΔW_i) X_i‖²  =  ⟨M D G, D⟩ − 2⟨M P, D⟩ + C,    C = Σ_i ⟨M_ii, E_i⟩
    ‖Δ‖_F               =  sqrt(⟨M D, D⟩)

so evaluating the attract and regulariser terms costs ``O(R·d²)`` whatever the number of
tokens. The repel term is evaluated on each concept's aligned row sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from loraclr_ext.errors import SolverError
from loraclr_ext.solver.precision import solve_dtype
from loraclr_ext.solver.settings import SolverSettings
from loraclr_ext.solver.stats import LayerStats


@dataclass
class RepelSample:
    """Aligned sample rows of every concept, pre-multiplied for fast distances.

    Attributes:
        base_out: ``[n, m, out]`` base outputs ``W0 x`` on each concept's sample rows.
        targets: ``[n, m, out]`` concept targets ``(W0 + ΔW_i) x``.
        coords: ``[n, m, d]`` the rows in solver coordinates ``z`` (``B x`` or ``x``).
        scale: factor turning a sample norm into the configured distance unit.
    """

    base_out: torch.Tensor
    targets: torch.Tensor
    coords: torch.Tensor
    scale: float


@dataclass
class FactorProblem:
    """Everything the objective of one layer needs, on one device in one precision
    (fp64 where the device has it, see :mod:`loraclr_ext.solver.precision`).

    Shapes: ``U [out, R]``, ``M [R, R]``, ``G [d, d]`` (concept Gram, ridge not included),
    ``G0 [d, d]`` neutral Gram or ``None``, ``P [R, d]``, ``blocks`` the column range of
    each concept in ``U``.
    """

    U: torch.Tensor
    M: torch.Tensor
    G: torch.Tensor
    G0: torch.Tensor | None
    neutral_weight: float
    P: torch.Tensor
    prior: torch.Tensor
    C: float
    blocks: list[tuple[int, int]]
    weight_total: float
    settings: SolverSettings
    repel: RepelSample | None

    @property
    def concepts(self) -> int:
        return len(self.blocks)

    def attract(self, D: torch.Tensor) -> torch.Tensor:
        """``Σ_i ‖(Δ − ΔW_i) X_i‖²`` (token-weighted), clamped at 0 against round-off."""
        value = (self.M @ D @ self.G * D).sum() - 2 * (self.M @ self.P * D).sum() + self.C
        return value.clamp_min(0)

    def preserve(self, D: torch.Tensor) -> torch.Tensor:
        """``‖Δ X_0‖²`` on neutral inputs (0 when none were recorded); per output element
        (mean squared change) in scale-free mode, like the attract term."""
        if self.G0 is None:
            return D.new_zeros(())
        return (self.M @ D @ self.G0 * D).sum() * self.preserve_scale()

    def preserve_scale(self) -> float:
        if self.scale_free and self.neutral_weight > 0:
            return 1.0 / (self.neutral_weight * self.U.shape[0])
        return 1.0

    def delta_norm(self, D: torch.Tensor) -> torch.Tensor:
        """``‖Δ‖_F``."""
        return (self.M @ D * D).sum().clamp_min(0).sqrt()

    def distances(self, D: torch.Tensor) -> torch.Tensor:
        """``dist[a, b] = ‖Ŷ_a − Y_b‖`` over the aligned samples, in distance units ``[n, n]``."""
        assert self.repel is not None
        merged = self.repel.base_out + self.repel.coords @ (self.U @ D).T  # [n, m, out]
        a = merged.reshape(merged.shape[0], -1)
        b = self.repel.targets.reshape(a.shape)
        # ‖a−b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩ avoids an [n, n, m, out] difference tensor
        sq = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T
        return sq.clamp_min(1e-30).sqrt() * self.repel.scale

    def separation(self) -> torch.Tensor:
        """``sep[i, j] = ‖Y_i − Y_j‖`` between the concepts' own targets ``[n, n]``."""
        assert self.repel is not None
        t = self.repel.targets.reshape(self.concepts, -1)
        sq = t.pow(2).sum(1)[:, None] + t.pow(2).sum(1)[None, :] - 2 * t @ t.T
        return sq.clamp_min(0).sqrt() * self.repel.scale

    def hinge(self, D: torch.Tensor) -> torch.Tensor:
        """``Σ_i max(0, m − d_i⁻)²`` with the objective's choice of negative distance.

        Scale-free mode uses a relative margin per pair, ``m·‖Y_i − Y_j‖``: the merged output
        on j's inputs must keep at least a fraction ``m`` of the true separation from i's
        target, and rows where the concepts agree ask for nothing.
        """
        if self.repel is None or self.concepts < 2 or not self.settings.has_repel:
            return D.new_zeros(())
        dist = self.distances(D)
        if self.settings.objective == "loraclr":
            dist = dist.T  # paper: target of i against merged output on j
        margin = self.settings.margin
        if self.scale_free:
            violation = torch.relu(margin * self.separation() - dist)
            others = 1 - torch.eye(self.concepts, dtype=dist.dtype, device=dist.device)
            violation = violation * others
            return violation.max(dim=1).values.pow(2).sum()
        off = dist + torch.diag(
            torch.full((self.concepts,), torch.inf, dtype=dist.dtype, device=dist.device)
        )
        negative = off.min(dim=1).values
        return torch.relu(margin - negative).pow(2).sum()

    def value(self, D: torch.Tensor) -> torch.Tensor:
        """The configured objective at ``D``."""
        s, n = self.settings, self.concepts
        attract = self.attract(D)
        if s.objective == "least_squares":
            return attract
        repel_weight = s.repel if s.objective == "loraclr" else 1.0
        attract = attract * self.attract_scale()
        total = (attract + repel_weight * self.hinge(D)) / n + self.regulariser(D)
        if s.objective == "official":
            total = total + s.mse * attract / (self.weight_total * self.U.shape[0])
        if s.preserve > 0:
            total = total + s.preserve * self.preserve(D)
        return total

    @property
    def scale_free(self) -> bool:
        """``loraclr`` with ``rms`` distances: every term in activation units."""
        return self.settings.objective == "loraclr" and self.settings.distance == "rms"

    def mean_input_power(self) -> float:
        """``tr(G)/d``: the average squared input per dimension, summed over rows."""
        return float(self.G.diagonal().mean())

    def regulariser(self, D: torch.Tensor) -> torch.Tensor:
        """``λ‖Δ‖`` (paper, code); scale-free: ``λ‖Δ − ΣΔW_i‖²·(tr G/d)/(Σw·out)``: λ times the
        mean squared output change the departure from stacking would cause on isotropic
        inputs of the layer's power. It is a relative ridge towards the stacked LoRAs, so
        input directions the recorded features never excite keep the LoRAs' own behaviour
        (and one LoRA merged alone is reproduced exactly)."""
        s = self.settings
        if self.scale_free:
            power = self.mean_input_power() / (self.weight_total * self.U.shape[0])
            away = D - self.prior
            return s.reg * power * (self.M @ away * away).sum()
        return s.reg * self.delta_norm(D)

    def attract_scale(self) -> float:
        """1 for sums (paper, code); ``N / (Σ weights · out)`` in ``rms`` mode, so that the
        attract term is each concept's mean squared error per output element and stays
        commensurate with a margin measured in RMS units."""
        if self.scale_free:
            return self.concepts / (self.weight_total * self.U.shape[0])
        return 1.0

    def quadratic_coefficient(self) -> float:
        """``a`` such that the hinge-free objective is ``a·attract + λ‖Δ‖ + ν·preserve``."""
        s = self.settings
        if s.objective == "least_squares":
            return 1.0
        a = self.attract_scale() / self.concepts
        if s.objective == "official":
            a += s.mse / (self.weight_total * self.U.shape[0])
        return a


def build_problem(
    stats: LayerStats,
    ups: list[torch.Tensor],
    base_weight: torch.Tensor | None,
    settings: SolverSettings,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> FactorProblem:
    """Assemble the factor-space problem of one layer.

    Args:
        stats: the layer's streamed statistics (concept order = ``ups`` order).
        ups: each concept's up factor ``[out, r_i]``.
        base_weight: ``W0`` ``[out, in]``; needed for the repel term only.
        settings: objective and hyper-parameters.
        device: where to solve (default: where the statistics live).
        dtype: precision of the problem (default: fp64 where ``device`` has it, else fp32).
    """
    device = torch.device(device or stats.device)
    dtype = dtype or solve_dtype(device)
    spec: dict[str, Any] = {"device": device, "dtype": dtype}
    if len(ups) != stats.concepts:
        raise SolverError(f"{len(ups)} up factors for {stats.concepts} concepts.")
    out = int(ups[0].shape[0])
    for i, (up, down) in enumerate(zip(ups, stats.downs, strict=True)):
        if up.ndim != 2 or up.shape[0] != out or up.shape[1] != down.shape[0]:
            raise SolverError(
                f"Concept {i}: up {tuple(up.shape)} does not fit down {tuple(down.shape)} "
                f"(expected [{out}, {down.shape[0]}])."
            )
    if base_weight is not None and tuple(base_weight.shape) != (out, stats.in_features):
        raise SolverError(
            f"Base weight {tuple(base_weight.shape)} does not match the LoRA deltas "
            f"[{out}, {stats.in_features}]."
        )
    U = torch.cat([u.detach().to(**spec) for u in ups], dim=1)
    if not torch.isfinite(U).all():
        raise SolverError("An up factor contains NaN or Inf.")
    M = U.T @ U
    P = torch.cat([p.to(**spec) for p in stats.cross])
    blocks, start = [], 0
    for up in ups:
        blocks.append((start, start + int(up.shape[1])))
        start += int(up.shape[1])
    C = math.fsum(
        float((M[a:b, a:b] * e.to(**spec)).sum())
        for (a, b), e in zip(blocks, stats.self_cross, strict=True)
    )
    G0 = None if stats.neutral_gram is None else stats.neutral_gram.to(**spec)
    repel = None
    if settings.has_repel and base_weight is not None and stats.concepts > 1:
        repel = _repel_sample(stats, ups, base_weight, settings, device, dtype)
    return FactorProblem(
        U=U,
        M=M,
        G=stats.gram.to(**spec),
        G0=G0,
        neutral_weight=stats.neutral_weight,
        P=P,
        prior=_prior(stats, device, dtype),
        C=C,
        blocks=blocks,
        weight_total=max(sum(stats.weight), 1e-30),
        settings=settings,
        repel=repel,
    )


def _prior(stats: LayerStats, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``D`` of the stacked delta ``Σ_i ΔW_i = U·[down_1; …; down_n]`` in solver coordinates."""
    downs = torch.cat([d.to(device, dtype) for d in stats.downs])  # [R, in]
    if stats.basis is None:
        return downs
    return downs @ stats.basis.to(device, dtype).T


def _repel_sample(
    stats: LayerStats,
    ups: list[torch.Tensor],
    base_weight: torch.Tensor,
    settings: SolverSettings,
    device: torch.device,
    dtype: torch.dtype,
) -> RepelSample | None:
    rows = [s.rows for s in stats.samples if s.rows is not None]
    if len(rows) < len(stats.samples) or any(r.shape[0] == 0 for r in rows):
        return None
    m = min(int(r.shape[0]) for r in rows)
    # The sample products run in fp32 (they are O(n·m·in·out)); the solve in ``dtype``.
    x = torch.stack([r[:m].to(device, torch.float32) for r in rows])  # [n, m, in]
    w0 = base_weight.to(device, torch.float32)
    base_out = x @ w0.T
    moved = torch.stack(
        [
            (x[i] @ d.to(device, torch.float32).T) @ u.to(device, torch.float32).T
            for i, (u, d) in enumerate(zip(ups, stats.downs, strict=True))
        ]
    )
    targets = (base_out + moved).to(dtype)
    base_out = base_out.to(dtype)
    coords = (x if stats.basis is None else x @ stats.basis.to(device, torch.float32).T).to(dtype)
    out = int(w0.shape[0])
    if settings.distance == "sum":
        mean_rows = sum(stats.rows) / len(stats.rows)
        scale = (mean_rows / m) ** 0.5
    else:
        scale = 1.0 / (m * out) ** 0.5
    return RepelSample(base_out=base_out, targets=targets, coords=coords, scale=scale)


def objective_from_features(
    delta: torch.Tensor,
    base_weight: torch.Tensor,
    features: list[torch.Tensor],
    concept_deltas: list[torch.Tensor],
    settings: SolverSettings,
) -> float:
    """Reference evaluation of the objective directly on full features (no statistics).

    Args:
        delta: merged ``Δ`` ``[out, in]``.
        base_weight: ``W0`` ``[out, in]``.
        features: each concept's inputs ``X_i`` ``[rows, in]`` (same rows for all, aligned).
        concept_deltas: each ``ΔW_i`` ``[out, in]``.
        settings: objective and hyper-parameters (``distance`` must be ``"sum"`` or rows equal).

    Used by the benchmark and the tests to score every method on identical terms.
    """
    f = [x.double() for x in features]
    w0, dl = base_weight.double(), delta.double()
    preds = torch.stack([x @ (w0 + dl).T for x in f])
    targets = torch.stack([x @ (w0 + d.double()).T for x, d in zip(f, concept_deltas, strict=True)])
    n, rows, out = preds.shape
    attract = (preds - targets).pow(2).sum()
    if settings.objective == "least_squares":
        return float(attract)
    dist = (preds[:, None] - targets[None, :]).pow(2).sum(dim=(2, 3)).sqrt()
    if settings.distance == "rms":
        dist = dist / (rows * out) ** 0.5
    hinge = dist.new_zeros(())
    if settings.has_repel and n > 1:
        d = dist.T if settings.objective == "loraclr" else dist
        if settings.objective == "loraclr" and settings.distance == "rms":
            flat = targets.reshape(n, -1)
            sep = torch.cdist(flat, flat) / (rows * out) ** 0.5
            violation = torch.relu(settings.margin * sep - d) * (1 - torch.eye(n, dtype=d.dtype))
            hinge = violation.max(dim=1).values.pow(2).sum()
        else:
            off = d + torch.diag(torch.full((n,), torch.inf, dtype=d.dtype))
            hinge = torch.relu(settings.margin - off.min(dim=1).values).pow(2).sum()
    repel_weight = settings.repel if settings.objective == "loraclr" else 1.0
    reg = settings.reg * dl.norm()
    if settings.objective == "loraclr" and settings.distance == "rms":
        attract = attract / (rows * out)
        power = sum(float(x.pow(2).sum()) for x in f) / f[0].shape[1]
        away = dl - sum(d.double() for d in concept_deltas)
        reg = settings.reg * power / (n * rows * out) * away.pow(2).sum()
    total = (attract + repel_weight * hinge) / n + reg
    if settings.objective == "official":
        total = total + settings.mse * attract / (n * rows * out)
    return float(total)
