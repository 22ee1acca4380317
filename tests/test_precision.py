"""No float64 where the device has none (Apple MPS), and fp32 solves as good as fp64 ones.

There is no Apple GPU here, so a device without float64 is emulated on the CPU by
replacing :func:`loraclr_ext.solver.precision.has_float64`, the one place that decides.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraclr_ext.pipeline.options import MergeOptions
from loraclr_ext.solver import OFFICIAL_DEFAULTS, LayerStats, SolverSettings, precision, solve_layer
from loraclr_ext.solver.objective import build_problem, objective_from_features

ENGINE = MergeOptions().solver_settings()
HINGE = SolverSettings(distance="rms", margin=50.0, repel=1.0, iterations=10)
LS = SolverSettings(objective="least_squares")
FP32_BOUND = 1e-4
"""fp32 against fp64 on the same statistics: relative difference of the merged delta (closed
form) or of the objective reached (when L-BFGS refines) stays below this."""


class Float64Guard(TorchDispatchMode):
    """Records every aten op (forward and backward) that produces a float64 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, tuple | list) else (out,)
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in results):
            self.seen.append(str(func))
        return out


def layer(n=3, out=48, fan_in=40, rows=231, rank=4, seed=0):
    """fp32 statistics of an aligned problem, as the engine streams them."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, fan_in, generator=g) / fan_in**0.5
    ups = [0.3 * torch.randn(out, rank, generator=g) for _ in range(n)]
    downs = [torch.randn(rank, fan_in, generator=g) / fan_in**0.5 for _ in range(n)]
    shared = torch.randn(rows, fan_in, generator=g)
    feats = [shared + 0.5 * torch.randn(rows, fan_in, generator=g) for _ in range(n)]
    stats = LayerStats(downs, sample_size=64)
    for i, x in enumerate(feats):
        for chunk in x.split(77):
            stats.add(i, chunk)
    return w0, ups, downs, feats, stats


@pytest.fixture
def no_float64(monkeypatch):
    """Make the CPU look like a device without float64 (Apple MPS)."""
    monkeypatch.setattr(precision, "has_float64", lambda device: False)


def test_devices_without_float64_are_known():
    assert not precision.has_float64("mps")
    assert precision.has_float64("cpu")
    assert precision.has_float64(torch.device("cuda", 0))
    assert precision.solve_dtype("mps") == torch.float32
    assert precision.solve_dtype("cpu") == torch.float64


def test_float64_device_solves_in_float64():
    w0, ups, _, _, stats = layer()
    problem = build_problem(stats, ups, w0, ENGINE)
    assert problem.G.dtype == problem.U.dtype == problem.repel.coords.dtype == torch.float64


@pytest.mark.slow  # the guard runs every op through Python: ~10 s
def test_no_float64_device_never_makes_a_float64_tensor(no_float64):
    w0, ups, _, _, stats = layer()
    guard = Float64Guard()  # sees every op, the refinement's backward passes included
    with guard:
        solution = solve_layer(stats, ups, w0, replace(HINGE, iterations=3))
    assert solution.iterations > 0
    assert guard.seen == []
    assert solution.up.dtype == solution.down.dtype == torch.float32


@pytest.mark.parametrize(
    "settings",
    [ENGINE, OFFICIAL_DEFAULTS, LS, pytest.param(HINGE, marks=pytest.mark.slow)],
    ids=["engine", "official", "lsq", "hinge"],
)
def test_fp32_solve_matches_the_fp64_solution(settings, monkeypatch):
    w0, ups, downs, feats, stats = layer()
    reference = solve_layer(stats, ups, w0, settings)
    monkeypatch.setattr(precision, "has_float64", lambda device: False)
    solution = solve_layer(stats, ups, w0, settings)
    assert solution.exact_rank == reference.exact_rank
    deltas = [u @ d for u, d in zip(ups, downs, strict=True)]
    if reference.iterations == 0:  # closed form: the same matrix
        diff = (solution.dense() - reference.dense()).norm() / reference.dense().norm()
        assert float(diff) < FP32_BOUND
    else:  # refined: an objective as low (L-BFGS paths may differ in the last digits)
        assert solution.iterations > 0

        def score(delta):
            return objective_from_features(delta, w0, feats, deltas, settings)

        assert score(solution.dense()) <= score(reference.dense()) * (1 + FP32_BOUND)


def test_fp32_solve_survives_singular_statistics(no_float64):
    """Fewer rows than inputs and no ridge: fp32 Cholesky needs its jitter, and gets it."""
    w0, ups, _, _, stats = layer(rows=10)
    settings = SolverSettings(ridge=0.0, reg=0.0, margin=0.0)
    solution = solve_layer(stats, ups, w0, settings)
    assert torch.isfinite(solution.dense()).all()


def test_weight_fingerprint_makes_no_float64_on_such_a_device(no_float64):
    from loraclr_ext.hosts.weights import weights_fingerprint

    module = torch.nn.Linear(8, 4)
    guard = Float64Guard()
    with guard:
        first = weights_fingerprint(module)
    assert guard.seen == []
    assert weights_fingerprint(module) == first
    with torch.no_grad():
        module.weight[0, 0] += 1.0
    assert weights_fingerprint(module) != first
