"""The report's shares and its joint-prompt measures, on exact cases and a tiny SD1 model."""

from __future__ import annotations

import math

import pytest
import torch

from loraclr_ext.model.architecture import Architecture
from loraclr_ext.pipeline.collect import trigger_ids
from loraclr_ext.pipeline.options import JOINT_TEMPLATES, ConceptSpec, MergeOptions
from loraclr_ext.pipeline.plan import is_cross_kv, plan_merge
from loraclr_ext.report.joint import evaluate_joint, joint_prompts
from loraclr_ext.report.quality import baselines
from loraclr_ext.report.shares import Gram, relative_error


def gram_of(change, own, others):
    gram = Gram()
    gram.add(change, own, others)
    return gram


def test_shares_recover_the_mixing_coefficients():
    gen = torch.Generator().manual_seed(0)
    own, others, rest = torch.randn(3, 50, 8, generator=gen, dtype=torch.float64)
    # Remove from ``rest`` what lies in the span of own/others: it must not move the fit.
    basis, _ = torch.linalg.qr(torch.stack([own.flatten(), others.flatten()], 1))
    rest = rest.flatten() - basis @ (basis.T @ rest.flatten())
    for a, b in ((1.0, 1.0), (1 / 3, 1 / 3), (1.0, 0.0), (0.8, -0.2)):
        change = a * own + b * others + 0.5 * rest.reshape(own.shape)
        shares = gram_of(change, own, others).shares()
        assert shares.own == pytest.approx(a, abs=1e-9)
        assert shares.others == pytest.approx(b, abs=1e-9)


def test_averaging_reads_one_over_n_not_a_negative_leak():
    """The old leak, ⟨merged − own, others⟩ / ‖others‖², read averaging as negative when the
    concepts' effects share a direction (the half of its own effect that averaging drops
    projects on the other's); the shares separate the two."""
    gen = torch.Generator().manual_seed(1)
    common = torch.randn(200, generator=gen, dtype=torch.float64)
    own = 2 * common + 0.3 * torch.randn(200, generator=gen, dtype=torch.float64)
    other = common + 0.3 * torch.randn(200, generator=gen, dtype=torch.float64)
    averaged = (own + other) / 2
    old = float((averaged - own) @ other / (other @ other))
    assert old < 0
    shares = gram_of(averaged, own, other).shares()
    assert shares.own == pytest.approx(0.5, abs=1e-9) and shares.others == pytest.approx(0.5)


def test_shares_of_parallel_or_missing_effects():
    own = torch.ones(10)
    assert gram_of(2 * own, own, torch.zeros(10)).shares().own == pytest.approx(2.0)
    assert gram_of(2 * own, own, torch.zeros(10)).shares().others == 0.0
    parallel = gram_of(3 * own, own, 2 * own).shares()
    assert parallel.own == pytest.approx(3.0) and parallel.others == 0.0
    assert math.isnan(gram_of(own, torch.zeros(10), torch.zeros(10)).shares().own)


def test_relative_error_matches_the_direct_norms_and_sums_over_places():
    gen = torch.Generator().manual_seed(2)
    out, own, base = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    direct = float((out - own).norm() / (own - base).norm())
    assert relative_error(out, own, base) == pytest.approx(direct, rel=1e-9)
    split = Gram()
    for rows in (slice(0, 1), slice(1, 4)):
        split.include(gram_of(out[rows] - base[rows], own[rows] - base[rows], base[rows] * 0))
    assert split.relative_error() == pytest.approx(direct, rel=1e-9)
    assert math.isnan(relative_error(out, base, base))


def test_joint_prompts_name_every_concept_first_and_second():
    assert joint_prompts(["a"]) == []
    two = joint_prompts(["sks dog", "zwx cat"])
    assert [p.text for p in two] == [
        JOINT_TEMPLATES[0].format("sks dog", "zwx cat"),
        JOINT_TEMPLATES[1].format("zwx cat", "sks dog"),
    ]
    four = joint_prompts(["a", "b", "c", "d"])
    assert len(four) == 8
    for i in range(4):
        assert sum(p.first == i for p in four) == 2 and sum(p.second == i for p in four) == 2
    assert {frozenset((p.first, p.second)) for p in four} == {
        frozenset(pair) for pair in ((0, 1), (1, 2), (2, 3), (3, 0))
    }


@pytest.fixture(scope="module")
def two(tiny, tmp_path_factory):
    src = tiny["src"]
    specs = [
        ConceptSpec(src / "sks_dog.safetensors", "sks dog"),
        ConceptSpec(src / "people" / "zwx_cat.safetensors", "zwx cat"),
    ]
    out = tmp_path_factory.mktemp("joint") / "merged.safetensors"
    plan = plan_merge(specs, MergeOptions(), Architecture.SD1, out, check_shapes=False)
    host = tiny["host"]
    return plan, host, host.modules(plan.refs)


def joint_scores(two, methods):
    plan, host, modules = two
    concepts = plan.concepts
    return evaluate_joint(
        host,
        modules,
        [c.prompt for c in concepts],
        trigger_ids(host, concepts),
        [c.deltas for c in concepts],
        methods,
    )


def test_a_concepts_own_lora_scores_perfectly_for_it(two):
    plan, _, _ = two
    first = plan.concepts[0].deltas
    score = joint_scores(two, {"first alone": first})["first alone"][0]
    assert score.text < 1e-6 and score.kv < 1e-6
    assert score.own == pytest.approx(1.0, abs=1e-6)
    assert abs(score.bleed) < 1e-6


def test_stacking_bleeds_all_and_averaging_half_of_the_partner(two):
    """The tiny LoRAs change every layer of both parts, so the partner's effect at a
    concept's tokens is as large as its own: stacking carries ~all of it, averaging ~half."""
    plan, _, _ = two
    assert any(is_cross_kv(r) for r in plan.refs)
    scores = joint_scores(two, baselines(plan))
    for stacked, average in zip(scores["stacked"], scores["average"], strict=True):
        assert stacked.own == pytest.approx(1.0, abs=0.1)
        assert stacked.bleed == pytest.approx(1.0, abs=0.1)
        assert average.own == pytest.approx(0.5, abs=0.1)
        assert average.bleed == pytest.approx(0.5, abs=0.1)
        assert stacked.kv > 0.3 and average.kv > 0.3


def test_report_json_has_no_nan():
    """Strict JSON (a browser's JSON.parse, FastAPI's encoder) has no NaN: a measure that
    does not apply is null."""
    import json

    from loraclr_ext.report.quality import ConceptScore, MethodScores, QualityReport

    report = QualityReport([MethodScores("loraclr", [ConceptScore("a", 0.1, 0.2, 0.3, 0.4)], 1, 1)])
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    concept = json.loads(text)["methods"][0]["concepts"][0]
    assert concept["joint_bleed"] is None and concept["text_trigger"] == 0.1
