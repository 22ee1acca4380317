"""Per-layer solve: closed-form warm start, contrastive refinement, exact LoRA factors.

1. **Closed form.** Without the hinge, the objective is ``a·attract + λ‖Δ‖ + ν·preserve``.
   Its stationarity condition ``D (aG + νG0 + τI) = aP`` with ``τ = λ / (2‖Δ‖)`` is a
   one-dimensional fixed point in ``τ``, solved by safeguarded Newton steps of one
   Cholesky factorisation each (an eigendecomposition costs ~10× more). λ = 0 gives plain
   ridge; Mix-of-Show's least squares is the ``least_squares`` case (minimum norm).
2. **Refinement.** If any concept's negative distance is below the margin there, the hinge
   is active and L-BFGS minimises the full objective in factor space from that start. If
   none is, the start is already the exact optimum: the hinge-free objective is a lower
   bound that it attains.
3. **Factors.** ``Δ = U D`` is factored exactly as ``Q·(R_u D)`` (QR of ``U``) and an SVD of
   the small ``R_u D``; only numerically-zero singular values are dropped unless a target
   rank is asked for, in which case the kept energy and output fractions are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraclr_ext.errors import SolverError
from loraclr_ext.solver.objective import FactorProblem, build_problem
from loraclr_ext.solver.precision import round_off
from loraclr_ext.solver.settings import SolverSettings
from loraclr_ext.solver.stats import LayerStats

ZERO_SINGULAR = 1e-7
"""Singular values below this fraction of the largest are round-off, not signal."""


@dataclass
class LayerSolution:
    """The merged delta of one layer as exact LoRA factors, and how it was reached.

    Attributes:
        up: ``[out, k]``; down: ``[k, in]`` (``in`` flattened ``in·kh·kw`` for convs),
            with ``Δ = up @ down`` and ``√σ`` folded into both for fp16-safe magnitudes.
        exact_rank: rank of the untruncated merged delta (≤ Σ ranks).
        energy_kept: ``Σ_{kept} σ² / Σ σ²`` (1.0 when not truncated).
        output_kept: ``1 − ‖(Δ−Δ_k)X‖² / ‖ΔX‖²`` on the concepts' inputs (1.0 if untruncated).
        start_value / final_value: objective at the closed form and at the end.
        iterations: L-BFGS iterations run (0 when the closed form was optimal).
        repel_active: whether any hinge was active at the closed form.
        notes: fallbacks taken (rank-deficient statistics, zero delta, …).
    """

    up: torch.Tensor
    down: torch.Tensor
    exact_rank: int
    energy_kept: float
    output_kept: float
    start_value: float
    final_value: float
    iterations: int
    repel_active: bool
    notes: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def dense(self) -> torch.Tensor:
        """``Δ`` ``[out, in]``."""
        return self.up @ self.down


def closed_form(problem: FactorProblem, notes: list[str] | None = None) -> torch.Tensor:
    """Exact minimiser ``D [R, d]`` of the hinge-free objective (see module docstring)."""
    s = problem.settings
    a = problem.quadratic_coefficient()
    H = a * problem.G
    if problem.G0 is not None and s.preserve > 0:
        H = H + s.preserve * problem.preserve_scale() * problem.G0
    trace = float(H.diagonal().sum())
    if trace <= 0:
        _note(notes, "empty statistics: merged delta is zero")
        return torch.zeros_like(problem.P)
    rhs = a * problem.P  # [R, d]
    if s.objective == "least_squares":
        return _min_norm_solve(H, rhs, notes)
    ridge = s.ridge * trace / H.shape[0]
    H = H + ridge * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    if s.reg <= 0:
        return _shifted_solve(H, rhs, 0.0)
    if problem.scale_free:  # squared regulariser: a relative ridge of λ towards stacking
        shift = a * s.reg * problem.mean_input_power()
        return _shifted_solve(H, rhs + shift * problem.prior, shift)
    solved = _solve_norm_shift(H, rhs, problem.M, s.reg / 2)
    if solved is None:
        _note(notes, "regulariser dominates: merged delta is zero")
        return torch.zeros_like(problem.P)
    return solved


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of the symmetric positive (semi)definite ``H``.

    In fp32 round-off can make a well-posed but ill-conditioned ``H`` look indefinite;
    then the smallest diagonal jitter (from one unit of round-off of its mean diagonal,
    growing tenfold) that factorises is added. fp64 problems practically never need it.
    """
    factor, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return factor
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    jitter = round_off(H.dtype) * max(float(H.diagonal().abs().mean()), 1e-30)
    for _ in range(16):
        factor, info = torch.linalg.cholesky_ex(H + jitter * eye)
        if int(info) == 0:
            return factor
        jitter *= 10
    raise SolverError("The layer's input statistics are not positive semidefinite (NaN?).")


def _shifted_solve(H: torch.Tensor, rhs: torch.Tensor, tau: float) -> torch.Tensor:
    """``rhs (H + τI)⁻¹`` by Cholesky (``H`` symmetric positive definite)."""
    shifted = H + tau * torch.eye(H.shape[0], dtype=H.dtype, device=H.device) if tau else H
    return torch.cholesky_solve(rhs.T, _cholesky(shifted)).T


def _min_norm_solve(H: torch.Tensor, rhs: torch.Tensor, notes: list[str] | None) -> torch.Tensor:
    """``rhs H⁺``: least squares, minimum norm where the inputs are rank-deficient."""
    factor, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, factor).T
    evals, evecs = torch.linalg.eigh(H)
    floor = max(1e-12, 10 * H.shape[0] * round_off(H.dtype))  # round-off level of eigh
    keep = evals > floor * float(evals.max())
    _note(notes, "rank-deficient inputs: minimum-norm least squares")
    inv = torch.where(keep, 1.0 / evals.clamp_min(1e-300), 0.0)
    return ((rhs @ evecs) * inv) @ evecs.T


def _solve_norm_shift(
    H: torch.Tensor, rhs: torch.Tensor, M: torch.Tensor, half_reg: float
) -> torch.Tensor | None:
    """Minimise ``⟨D H, D⟩ − 2⟨rhs, D⟩``-type objective plus ``2·half_reg·‖U D‖``.

    Stationarity gives ``D(τ) = rhs (H + τI)⁻¹`` with ``τ·s(τ) = half_reg`` where
    ``s(τ) = ‖U D(τ)‖ = sqrt(⟨M D, D⟩)``; ``τ·s(τ)`` increases with ``τ``. Newton steps,
    each one Cholesky factorisation, converge in a few iterations because ``τ`` is tiny
    next to the spectrum of ``H`` in practice; a bisection guard keeps every step inside
    the bracket. Returns ``None`` when the optimum is ``Δ = 0``.
    """
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    limit = float(((M @ rhs) * rhs).sum().clamp_min(0).sqrt())  # lim τ→∞ of τ·s(τ)
    if half_reg >= limit:
        return None
    lo, hi = 0.0, float("inf")
    tau = 0.0
    tolerance = max(1e-10, 100 * round_off(H.dtype))
    for _ in range(60):
        factor = _cholesky(H + tau * eye)
        D = torch.cholesky_solve(rhs.T, factor).T
        norm = float(((M @ D) * D).sum().clamp_min(0).sqrt())
        g = tau * norm
        if abs(g - half_reg) <= tolerance * half_reg:
            return D
        if g < half_reg:
            lo = tau
        else:
            hi = tau
        # d(τ s)/dτ = s + τ s',  s s' = −⟨M D, D (H+τI)⁻¹⟩
        E = torch.cholesky_solve(D.T, factor).T
        slope = norm - tau * float(((M @ D) * E).sum()) / max(norm, 1e-300)
        step = tau + (half_reg - g) / slope if slope > 0 else float("nan")
        inside = lo < step < hi if hi < float("inf") else step > lo
        tau = step if inside else (0.5 * (lo + hi) if hi < float("inf") else max(2 * lo, 1e-12))
    return D


def refine(problem: FactorProblem, start: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """L-BFGS on the full objective from ``start``; returns (best D, iterations, best value)."""
    D = start.clone().requires_grad_(True)
    eps = round_off(start.dtype)
    optimizer = torch.optim.LBFGS(
        [D],
        lr=1.0,
        max_iter=problem.settings.iterations,
        history_size=20,
        tolerance_grad=max(1e-12, eps * 1e-2),
        tolerance_change=max(1e-14, eps * 1e-2),
        line_search_fn="strong_wolfe",
    )
    best_value, best_factor = float(problem.value(start)), start.clone()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = problem.value(D)
        value.backward()
        nonlocal best_value, best_factor
        current = float(value.detach())
        if current < best_value:
            best_value, best_factor = current, D.detach().clone()
        return value

    optimizer.step(closure)
    iterations = int(optimizer.state[optimizer._params[0]].get("n_iter", 0))
    return best_factor, iterations, best_value


def factorize(
    problem: FactorProblem, D: torch.Tensor, basis: torch.Tensor | None, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    """Exact (or rank-``rank``) LoRA factors of ``Δ = U D (B)``.

    Returns:
        ``up [out, k]``, ``down [k, in]`` (fp32), the exact rank, the kept energy fraction
        and the kept output fraction.
    """
    Q, R_u = torch.linalg.qr(problem.U)  # Q [out, R'], R_u [R', R]
    A = R_u @ D  # [R', d]
    left, sigma, right_t = torch.linalg.svd(A, full_matrices=False)
    top = float(sigma.max()) if sigma.numel() else 0.0
    zero = max(ZERO_SINGULAR, 10 * max(A.shape) * round_off(A.dtype))  # round-off of the SVD
    exact = int((sigma > zero * top).sum()) if top > 0 else 0
    keep = exact if rank is None else min(rank, exact)
    energy = float(sigma[:keep].pow(2).sum() / sigma.pow(2).sum()) if exact else 1.0
    output = 1.0
    if keep < exact:
        A_k = (left[:, :keep] * sigma[:keep]) @ right_t[:keep]
        err = A - A_k
        total = float((A @ problem.G * A).sum())
        output = 1.0 - float((err @ problem.G * err).sum()) / total if total > 0 else 1.0
    root = sigma[:keep].sqrt()
    up = (Q @ left[:, :keep]) * root
    down = root[:, None] * right_t[:keep]
    if basis is not None:
        down = down @ basis.to(down)
    return up.float(), down.float(), exact, energy, output


def solve_layer(
    stats: LayerStats,
    ups: list[torch.Tensor],
    base_weight: torch.Tensor | None,
    settings: SolverSettings,
    *,
    layer: str = "layer",
    dtype: torch.dtype | None = None,
) -> LayerSolution:
    """Merge one layer.

    Args:
        stats: the layer's statistics, concepts in the order of ``ups``.
        ups: each concept's up factor ``[out, r_i]``.
        base_weight: ``W0`` ``[out, in]`` (needed when the repel term is on).
        settings: objective, hyper-parameters, target rank.
        layer: name used in error messages.
        dtype: precision of the factor-space solve (default: fp64 where the statistics'
            device has it, else fp32; see :mod:`loraclr_ext.solver.precision`).
    """
    stats.check_complete(layer)
    if settings.has_repel and base_weight is None and stats.concepts > 1:
        raise SolverError(f"{layer}: the repel term needs the base weight W0.")
    if base_weight is not None and not torch.isfinite(base_weight).all():
        raise SolverError(f"{layer}: the base weight contains NaN or Inf.")
    problem = build_problem(stats, ups, base_weight, settings, dtype=dtype)
    notes: list[str] = []
    if sum(stats.rows) < stats.dim and settings.objective != "least_squares":
        notes.append(
            f"{sum(stats.rows)} input rows < {stats.dim} inputs: the relative ridge decides"
        )
    D = closed_form(problem, notes)
    start_value = float(problem.value(D))
    final_value, iterations = start_value, 0
    active = bool(problem.hinge(D) > 0)
    if active and settings.iterations > 0:
        D, iterations, final_value = refine(problem, D)
    up, down, exact, energy, output = factorize(problem, D, stats.basis, settings.rank)
    return LayerSolution(
        up=up,
        down=down,
        exact_rank=exact,
        energy_kept=energy,
        output_kept=output,
        start_value=start_value,
        final_value=final_value,
        iterations=iterations,
        repel_active=active,
        notes=notes,
    )
