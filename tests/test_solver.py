"""The per-layer solver: exactness, invariances, conv handling, streaming, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraclr_ext.errors import InvalidInputError, SolverError
from loraclr_ext.solver import (
    NEUTRAL,
    OFFICIAL_DEFAULTS,
    ConvGeometry,
    LayerStats,
    SolverSettings,
    input_rows,
    solve_layer,
)
from loraclr_ext.solver.baselines import official_recipe
from loraclr_ext.solver.objective import build_problem, objective_from_features
from loraclr_ext.solver.solve import closed_form

LS = SolverSettings(objective="least_squares")


def make_problem(n=3, out=24, fan_in=16, rows=120, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, fan_in, generator=g)
    ups = [torch.randn(out, rank, generator=g) for _ in range(n)]
    downs = [0.3 * torch.randn(rank, fan_in, generator=g) for _ in range(n)]
    feats = [torch.randn(rows, fan_in, generator=g) for _ in range(n)]
    return w0, ups, downs, feats


def stats_for(downs, feats, *, batches=1, dtype=torch.float64, **kw):
    stats = LayerStats(downs, dtype=dtype, sample_size=kw.pop("sample_size", 256), **kw)
    for i, x in enumerate(feats):
        for chunk in x.chunk(batches):
            stats.add(i, chunk)
    return stats


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("settings", [LS, SolverSettings(), OFFICIAL_DEFAULTS])
def test_one_concept_returns_its_own_delta(settings):
    w0, ups, downs, feats = make_problem(n=1)
    solution = solve_layer(stats_for(downs, feats), ups, w0, settings)
    assert rel(solution.dense(), ups[0] @ downs[0]) < 1e-4
    assert solution.exact_rank == 3


def test_closed_form_matches_lstsq():
    for seed in range(3):
        w0, ups, downs, feats = make_problem(seed=seed)
        x = torch.cat(feats).double()
        target = torch.cat([f.double() @ (u @ d).double().T for f, u, d in zip(feats, ups, downs)])
        reference = torch.linalg.lstsq(x, target).solution.T
        solution = solve_layer(stats_for(downs, feats), ups, w0, LS)
        assert rel(solution.dense(), reference) < 1e-5


def test_rank_deficient_least_squares_is_the_minimum_norm_solution():
    w0, ups, downs, feats = make_problem(rows=4, fan_in=16)  # 12 rows < 16 inputs
    x = torch.cat(feats).double()
    target = torch.cat([f.double() @ (u @ d).double().T for f, u, d in zip(feats, ups, downs)])
    reference = (torch.linalg.pinv(x) @ target).T
    solution = solve_layer(stats_for(downs, feats), ups, w0, LS)
    assert rel(solution.dense(), reference) < 1e-5
    assert any("minimum-norm" in note for note in solution.notes)


def test_singular_statistics_are_regularised_not_fatal():
    w0, ups, downs, feats = make_problem(rows=2)
    solution = solve_layer(stats_for(downs, feats), ups, w0, SolverSettings())
    assert torch.isfinite(solution.dense()).all()
    assert any("ridge" in note for note in solution.notes)


def test_permuting_concepts_changes_nothing():
    w0, ups, downs, feats = make_problem(n=4)
    order = [2, 0, 3, 1]
    for settings in (LS, SolverSettings(), SolverSettings(distance="rms", margin=10.0)):
        a = solve_layer(stats_for(downs, feats), ups, w0, settings).dense()
        b = solve_layer(
            stats_for([downs[i] for i in order], [feats[i] for i in order]),
            [ups[i] for i in order],
            w0,
            settings,
        ).dense()
        assert rel(b, a) < 1e-5


def test_factors_reproduce_the_full_merged_matrix():
    w0, ups, downs, feats = make_problem(n=4)
    stats = stats_for(downs, feats)
    settings = SolverSettings()
    problem = build_problem(stats, ups, w0, settings)
    full = problem.U @ closed_form(problem)  # [out, in], fp64, before factoring
    solution = solve_layer(stats, ups, w0, settings)
    assert solution.rank <= sum(u.shape[1] for u in ups)
    assert rel(solution.up.double() @ solution.down.double(), full) < 1e-6


def test_target_rank_reports_what_it_kept():
    w0, ups, downs, feats = make_problem(n=4)
    exact = solve_layer(stats_for(downs, feats), ups, w0, SolverSettings())
    sigma = torch.linalg.svdvals(exact.dense().double())
    reduced = solve_layer(stats_for(downs, feats), ups, w0, SolverSettings(rank=4))
    assert reduced.rank == 4
    expected = float(sigma[:4].pow(2).sum() / sigma.pow(2).sum())
    assert reduced.energy_kept == pytest.approx(expected, rel=1e-5)
    assert 0.0 < reduced.output_kept < 1.0
    assert exact.energy_kept == 1.0
    assert exact.output_kept == 1.0


def test_streaming_in_1_or_10_batches_gives_the_same_statistics():
    _, _, downs, feats = make_problem()
    one, ten = stats_for(downs, feats, batches=1), stats_for(downs, feats, batches=10)
    assert torch.allclose(one.gram, ten.gram, rtol=1e-12, atol=1e-10)
    for a, b in zip(one.cross + one.self_cross, ten.cross + ten.self_cross):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-10)
    assert one.rows == ten.rows


def test_memory_does_not_grow_with_the_stream():
    _, _, downs, feats = make_problem(rows=40)
    stats = LayerStats(downs, sample_size=32)
    sizes = None
    for _ in range(50):
        for i, x in enumerate(feats):
            stats.add(i, x)
        now = [t.numel() for t in (stats.gram, *stats.cross, *stats.self_cross)]
        now += [s.rows.shape[0] for s in stats.samples]
        sizes = sizes or now
        assert now == sizes
    assert all(s.rows.shape[0] == 32 for s in stats.samples)


def test_samples_are_aligned_across_concepts():
    index = torch.arange(500, dtype=torch.float32)[:, None].repeat(1, 4)
    stats = LayerStats([torch.ones(1, 4), torch.ones(1, 4)], sample_size=20, seed=7)
    for concept in (0, 1):
        for chunk in index.split(77):
            stats.add(concept, chunk)
    a, b = (s.rows[:, 0] for s in stats.samples)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 20


def test_zero_weight_rows_are_neither_fitted_nor_sampled():
    _w0, _ups, downs, feats = make_problem(n=2, rows=60)
    junk = [torch.randn(30, 16) * 100 for _ in feats]
    plain = stats_for(downs, feats)
    weighted = LayerStats(downs, dtype=torch.float64, sample_size=256)
    for i, (x, j) in enumerate(zip(feats, junk)):
        rows = torch.cat([x, j])
        weights = torch.cat([torch.ones(len(x)), torch.zeros(len(j))])
        weighted.add(i, rows, weights)
    assert torch.allclose(plain.gram, weighted.gram)
    assert all(s.rows.shape[0] == 60 for s in weighted.samples)


def test_linear_and_1x1_conv_paths_agree():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 5, 5, generator=g)  # [B, C, H, W]
    geometry = ConvGeometry(kernel=(1, 1))
    conv_rows = input_rows(x, geometry)
    linear_rows = input_rows(x.permute(0, 2, 3, 1), None)
    assert torch.equal(conv_rows, linear_rows)
    w0 = torch.randn(6, 8, generator=g)
    ups = [torch.randn(6, 2, generator=g) for _ in range(2)]
    downs = [torch.randn(2, 8, generator=g) for _ in range(2)]
    s_conv = LayerStats(downs, dtype=torch.float64)
    s_lin = LayerStats(downs, dtype=torch.float64)
    for i in range(2):
        s_conv.add(i, input_rows(x * (i + 1), geometry))
        s_lin.add(i, input_rows((x * (i + 1)).permute(0, 2, 3, 1), None))
    a = solve_layer(s_conv, ups, w0, SolverSettings()).dense()
    b = solve_layer(s_lin, ups, w0, SolverSettings()).dense()
    assert rel(a, b) < 1e-10


def test_kxk_conv_rows_reproduce_conv2d():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 9, generator=g)
    weight = torch.randn(5, 3, 3, 3, generator=g)
    geometry = ConvGeometry(kernel=(3, 3), stride=(2, 2), padding=(1, 1))
    rows = input_rows(x, geometry)  # [B·L, C·9]
    expected = F.conv2d(x, weight, stride=2, padding=1)  # [B, 5, 5, 5]
    got = (rows @ weight.reshape(5, -1).T).reshape(2, 25, 5).permute(0, 2, 1).reshape(2, 5, 5, 5)
    assert torch.allclose(got, expected, atol=1e-5)


def test_conv_merge_of_one_concept_is_exact():
    g = torch.Generator().manual_seed(5)
    geometry = ConvGeometry(kernel=(3, 3), padding=(1, 1))
    up, down = torch.randn(4, 2, generator=g), torch.randn(2, 3 * 9, generator=g)
    stats = LayerStats([down], dtype=torch.float64)
    stats.add(0, input_rows(torch.randn(3, 3, 8, 8, generator=g), geometry))
    solution = solve_layer(stats, [up], torch.randn(4, 27, generator=g), LS)
    assert rel(solution.dense(), up @ down) < 1e-6
    assert solution.down.shape == (2, 27)


def test_basis_spanning_everything_equals_the_dense_solve():
    w0, ups, downs, feats = make_problem()
    basis = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64)).Q.T
    dense = solve_layer(stats_for(downs, feats), ups, w0, SolverSettings()).dense()
    projected = solve_layer(stats_for(downs, feats, basis=basis), ups, w0, SolverSettings()).dense()
    assert rel(projected, dense) < 1e-6


def test_basis_keeps_the_down_factor_in_its_span():
    w0, ups, downs, feats = make_problem()
    basis = torch.linalg.qr(torch.cat(downs).double().T).Q.T  # [9, 16]
    solution = solve_layer(stats_for(downs, feats, basis=basis), ups, w0, SolverSettings())
    down = solution.down.double()
    assert rel(down @ basis.T @ basis, down) < 1e-6


def test_base_preservation_pulls_neutral_outputs_towards_the_base():
    w0, ups, downs, feats = make_problem(n=2)
    neutral = torch.randn(80, 16)
    moved = []
    for preserve in (0.0, 10.0):
        stats = stats_for(downs, feats)
        stats.add(NEUTRAL, neutral.double())
        delta = solve_layer(stats, ups, w0, SolverSettings(preserve=preserve)).dense()
        moved.append(float((neutral @ delta.T).norm()))
    assert moved[1] < 0.9 * moved[0]


def test_refinement_lowers_an_active_hinge():
    w0, ups, downs, feats = make_problem(n=3, rows=50)
    settings = SolverSettings(distance="rms", margin=50.0, repel=1.0)
    solution = solve_layer(stats_for(downs, feats), ups, w0, settings)
    assert solution.repel_active
    assert solution.iterations > 0
    assert solution.final_value < solution.start_value
    # the statistics-based value is the same objective as on raw features
    deltas = [u @ d for u, d in zip(ups, downs)]
    direct = objective_from_features(solution.dense(), w0, feats, deltas, settings)
    assert direct == pytest.approx(solution.final_value, rel=1e-5)


def test_ours_beats_the_official_recipe_on_its_own_objective():
    w0, ups, downs, feats = make_problem(n=3, out=32, fan_in=24, rows=77)
    deltas = [u @ d for u, d in zip(ups, downs)]
    official = official_recipe(w0, feats, deltas)
    ours = solve_layer(stats_for(downs, feats), ups, w0, OFFICIAL_DEFAULTS).dense()
    score = lambda d: objective_from_features(d, w0, feats, deltas, OFFICIAL_DEFAULTS)  # noqa: E731
    assert score(ours) < 0.7 * score(official)


def test_bad_inputs_raise_documented_errors():
    w0, ups, downs, feats = make_problem(n=2)
    stats = LayerStats(downs)
    with pytest.raises(SolverError, match="NaN or Inf"):
        stats.add(0, torch.full((3, 16), float("nan")))
    with pytest.raises(SolverError, match="expected \\[tokens, 16\\]"):
        stats.add(0, torch.randn(3, 15))
    with pytest.raises(SolverError, match="out of range"):
        stats.add(5, torch.randn(3, 16))
    stats.add(0, feats[0])
    with pytest.raises(SolverError, match="no input rows were recorded for concept\\(s\\) \\[1\\]"):
        solve_layer(stats, ups, w0, SolverSettings(), layer="te1:x")
    stats.add(1, feats[1])
    with pytest.raises(SolverError, match="does not fit down"):
        solve_layer(stats, [ups[0], torch.randn(24, 5)], w0, SolverSettings())
    with pytest.raises(SolverError, match="Base weight"):
        solve_layer(stats, ups, torch.randn(3, 3), SolverSettings())
    with pytest.raises(SolverError, match="needs the base weight"):
        solve_layer(stats, ups, None, SolverSettings())
    with pytest.raises(SolverError, match="down factor has shape"):
        LayerStats([torch.randn(2, 16), torch.randn(2, 15)])
    with pytest.raises(InvalidInputError, match="margin"):
        SolverSettings(margin=-1)
    with pytest.raises(InvalidInputError, match="objective"):
        SolverSettings(objective="mystery")


def test_scale_free_objective_matches_features_and_is_optimal_without_hinge():
    w0, ups, downs, feats = make_problem(n=3)
    settings = SolverSettings(distance="rms", margin=0.0, reg=1e-2)
    solution = solve_layer(stats_for(downs, feats), ups, w0, settings)
    deltas = [u @ d for u, d in zip(ups, downs)]
    value = objective_from_features(solution.dense(), w0, feats, deltas, settings)
    assert value == pytest.approx(solution.final_value, rel=1e-5)
    for scale in (0.99, 1.01):
        worse = objective_from_features(solution.dense() * scale, w0, feats, deltas, settings)
        assert worse > value
