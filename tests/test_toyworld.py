"""The trained toy world (issue 12, item 2): a tiny text-to-image model that draws what its
prompts name, DreamBooth LoRAs of new concepts on it, and the identity table of the merge.

The world is built once per session (a few CPU minutes) unless ``LORACLR_TOYWORLD_CACHE``
names a folder that already holds it (``python -m bench.toyworld`` fills ``./loraclr-toyworld``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Trains a model and four LoRAs, runs whole merges. Kept out of `./dev.sh test` (CI): the
# build takes ~20 CPU minutes here, and several bounds sit within a few hundredths of the
# measured values, which a different CPU's float rounding during training can move.
pytestmark = [pytest.mark.slow, pytest.mark.toyworld]

DENOISE_BOUND = 0.9
"""Measured 0.99 (class and colour of both slots from scenes noised to t = 333)."""
OWN_BOUND = 0.2
"""Measured raw identity of each LoRA alone in its own prompt: 0.67, 0.58, 0.40, 0.28."""


def identity_error(value: float) -> float:
    """Distance from the concept's own LoRA alone (1): an exaggerated identity (stacking
    sums both LoRAs' pushes) is as wrong as a faded one."""
    return abs(1.0 - value)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    from loraclr_ext.demo.toyworld.build import build_toy_world

    cache = os.environ.get("LORACLR_TOYWORLD_CACHE")
    return build_toy_world(Path(cache) if cache else tmp_path_factory.mktemp("toyworld"))


@pytest.fixture(scope="session")
def toy_host(toy_world):
    from loraclr_ext.hosts.standalone import StandaloneHost

    return StandaloneHost.load(toy_world.model, "cpu")


@pytest.fixture(scope="session")
def prototypes():
    from loraclr_ext.demo.toyworld.identity import fit_prototypes
    from loraclr_ext.demo.toyworld.world import build_world

    return fit_prototypes(build_world())


@pytest.fixture(scope="session")
def two_persons(toy_world):
    from loraclr_ext.demo.toyworld.table import CASES, case_table

    return case_table(CASES[0], toy_world)


@pytest.fixture(scope="session")
def four_concepts(toy_world):
    from loraclr_ext.demo.toyworld.table import CASES, case_table

    return case_table(CASES[1], toy_world)


def _generate(host, prompts, deltas, seeds=8):
    from loraclr_ext.demo.toyworld.identity import generate

    alphas = host.pipe.scheduler.alphas_cumprod.float()
    return generate(host, prompts, deltas, seeds=seeds, steps=10, alphas_cumprod=alphas)


def test_measure_reads_rendered_scenes_exactly(prototypes) -> None:
    """The recogniser's ceiling: every slot of fresh renders is recognised."""
    from loraclr_ext.demo.toyworld.identity import rendered_check
    from loraclr_ext.demo.toyworld.world import build_world

    assert rendered_check(build_world(), prototypes).both == 1.0


def test_base_model_knows_the_world_from_a_partly_noised_scene(toy_host, prototypes) -> None:
    """From t = 333 the model's x0 estimate has the class and colour of both slots right.
    (From pure noise it gets only about a third right: see bench/README.md.)"""
    from loraclr_ext.demo.toyworld.identity import denoised_recognition
    from loraclr_ext.demo.toyworld.world import build_world

    alphas = toy_host.pipe.scheduler.alphas_cumprod.float()
    found = denoised_recognition(toy_host, build_world(), prototypes, 333, alphas)
    assert found.both >= DENOISE_BOUND


def test_kohya_files_name_their_trigger_by_dataset_folder(toy_world) -> None:
    """As kohya DreamBooth files: no trigger phrase, the folder ``10_ohwx person`` names it."""
    from loraclr_ext.files.read import read_header
    from loraclr_ext.files.triggers import find_triggers

    for trigger, path in toy_world.loras.items():
        keys, metadata = read_header(path)
        found = find_triggers(metadata, path)
        assert found.source == "dataset"
        assert found.words[0].split()[0] == trigger
        assert any(k.startswith("lora_te_") for k in keys)
        assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys)


def test_each_lora_draws_its_identity_and_the_base_never_does(toy_world, toy_host, prototypes):
    """Raw identity (1 = as rendered): the base model draws none of a concept's code on its
    prompt; the concept's own LoRA draws most of it, at its place only."""
    from loraclr_ext.demo.toyworld.identity import raw_identity
    from loraclr_ext.demo.toyworld.world import CONCEPTS
    from loraclr_ext.files.read import read_lora
    from loraclr_ext.model.architecture import Architecture

    for concept in CONCEPTS:
        path = toy_world.loras[concept.trigger]
        deltas = read_lora(path, Architecture.SD1, check_shapes=False).deltas
        base = _generate(toy_host, [concept.prompt], {})[0]
        own = _generate(toy_host, [concept.prompt], deltas)[0]
        at_base = float(raw_identity(prototypes, base, 0, concept.trigger, concept.noun).mean())
        at_own = float(raw_identity(prototypes, own, 0, concept.trigger, concept.noun).mean())
        assert abs(at_base) < 0.15, concept
        assert at_own > OWN_BOUND, concept


@pytest.mark.parametrize("case", ["two_persons", "four_concepts"])
def test_table_is_normalised_to_base_and_own_lora(case, request) -> None:
    table = request.getfixturevalue(case)
    for concept in table.case.concepts:
        alone = table.row(f"{concept.trigger} alone")
        assert alone.single[concept.trigger] == pytest.approx(1.0)
        assert alone.joint[concept.trigger] == pytest.approx(1.0)
        assert table.row("base").joint[concept.trigger] == 0.0


def _xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


@pytest.mark.parametrize("case", ["two_persons", "four_concepts"])
def test_merge_keeps_more_two_concept_identity_than_averaging(case, request) -> None:
    table = request.getfixturevalue(case)
    assert table.row("loraclr").mean("joint") > table.row("average").mean("joint") + 0.02


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            "two_persons",
            marks=_xfail("measured: zwx 0.326 vs stacking 0.428 (ohwx 0.246 vs 0.242)"),
        ),
        pytest.param(
            "four_concepts",
            marks=_xfail("measured: sks 0.074 vs stacking 0.092 (others beat stacking)"),
        ),
    ],
)
def test_merge_beats_stacking_on_two_concept_identity(case, request) -> None:
    table = request.getfixturevalue(case)
    ours, stacked = table.row("loraclr"), table.row("stacked")
    for concept in table.case.concepts:
        t = concept.trigger
        assert identity_error(ours.joint[t]) < identity_error(stacked.joint[t]), t


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("two_persons", marks=_xfail("measured mean 0.286 vs least squares 0.328")),
        pytest.param("four_concepts", marks=_xfail("measured mean 0.065 vs least squares 0.088")),
    ],
)
def test_merge_beats_least_squares_on_two_concept_identity(case, request) -> None:
    table = request.getfixturevalue(case)
    ours, ls = table.row("loraclr"), table.row("least squares")
    for concept in table.case.concepts:
        t = concept.trigger
        assert identity_error(ours.joint[t]) < identity_error(ls.joint[t]), t


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("two_persons", marks=_xfail("measured: zwx 0.320 vs stacking 0.707")),
        pytest.param("four_concepts", marks=_xfail("measured: ohwx 0.041 vs stacking 0.178")),
    ],
)
def test_merge_loses_at_most_005_single_identity_to_the_better_baseline(case, request) -> None:
    table = request.getfixturevalue(case)
    rows = [table.row(m) for m in ("stacked", "least squares")]
    ours = table.row("loraclr")
    for concept in table.case.concepts:
        t = concept.trigger
        best = min(identity_error(r.single[t]) for r in rows)
        assert identity_error(ours.single[t]) <= best + 0.05, t
