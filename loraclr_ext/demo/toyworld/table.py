"""The toy world's table: identity per concept alone and in two-concept prompts, and bleed,
for the base model, each LoRA alone, stacking, averaging, least squares and the merge.

Scores are normalised per concept and prompt place: 0 is what the base model draws there,
1 what the concept's own LoRA alone draws there (same prompt, same seeds). Bleed at a
concept's place is the other concept's identity there, in units of what the other LoRA
alone draws in its own prompt.

A concept's place in a two-concept prompt is the left slot of the prompts that name it
first. The toy base model places the second-named object poorly (its recognition numbers
say how poorly), and a DreamBooth LoRA, trained on one-object images, draws its identity
in the left slot whatever the order, so the right slot is not scored. This is also where
two LoRAs collide: both push their identity into the same slot.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loraclr_ext.demo.toyworld.build import ToyWorldFiles, threads
from loraclr_ext.demo.toyworld.identity import Prototypes, fit_prototypes, generate, raw_identity
from loraclr_ext.demo.toyworld.world import CONCEPTS, ToyConcept, build_world
from loraclr_ext.engine import flat_shape, merge
from loraclr_ext.hosts.base import Host
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.collect import collect, new_stats
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
from loraclr_ext.pipeline.plan import MergePlan, plan_merge
from loraclr_ext.pipeline.progress import SilentProgress
from loraclr_ext.report.quality import baselines
from loraclr_ext.solver import SolverSettings, solve_layer

Deltas = Mapping[ModuleRef, ModuleDelta]


@dataclass(frozen=True)
class Case:
    """Concepts merged together, and the two-concept prompts as (left, right) indices."""

    name: str
    concepts: tuple[ToyConcept, ...]
    pairs: tuple[tuple[int, int], ...]

    def prompts(self) -> list[str]:
        """Each concept's prompt, then each pair's ``"<left> and <right>"``."""
        singles = [c.prompt for c in self.concepts]
        joint = [f"{self.concepts[a].prompt} and {self.concepts[b].prompt}" for a, b in self.pairs]
        return singles + joint


CASES = (
    Case("two persons", CONCEPTS[:2], ((0, 1), (1, 0))),
    Case("four concepts", CONCEPTS, ((0, 1), (1, 2), (2, 3), (3, 0))),
)
"""Two same-class concepts, each on both sides; four concepts in a cycle of pairs, so every
concept stands left once and right once."""


@dataclass(frozen=True)
class EvalSettings:
    """Sampling of the table (DDIM steps, seeds per prompt) and of the merge's recording."""

    seeds: int = 8
    steps: int = 10
    seed: int = 0
    merge: MergeOptions = field(
        default_factory=lambda: MergeOptions(
            output="toy-merged", size=64, steps=8, precision="fp32", overwrite=True, quality=False
        )
    )


@dataclass
class Row:
    """One method's normalised scores per concept trigger (NaN: not applicable)."""

    method: str
    single: dict[str, float]
    joint: dict[str, float]
    bleed: dict[str, float]

    def mean(self, column: str) -> float:
        values = [v for v in getattr(self, column).values() if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan


@dataclass
class CaseTable:
    """A case's rows and how they were made."""

    case: Case
    rows: list[Row]
    settings: EvalSettings
    seconds: float
    units: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per trigger, the raw identity (1 = as rendered) its own LoRA adds over the base
    model, alone and at its places in two-concept prompts: the scale of 1 in the table."""
    device: str = "cpu"

    def row(self, method: str) -> Row:
        return next(r for r in self.rows if r.method == method)

    def text(self) -> str:
        """The table as fixed-width text, one line per method, means last."""
        triggers = [c.trigger for c in self.case.concepts]
        head = f"{'method':<16}" + "".join(
            f"{t + ' 1x':>9}{t + ' 2x':>9}{t + ' bl':>9}" for t in triggers
        )
        head += f" | {'mean 1x':>8}{'mean 2x':>8}{'mean bl':>8}"
        lines = [head, "-" * len(head)]

        def cell(value: float) -> str:
            return f"{'—':>9}" if math.isnan(value) else f"{value:>9.3f}"

        for r in self.rows:
            line = f"{r.method[:16]:<16}" + "".join(
                cell(r.single[t]) + cell(r.joint[t]) + cell(r.bleed[t]) for t in triggers
            )
            means = (r.mean("single"), r.mean("joint"), r.mean("bleed"))
            line += " | " + "".join(cell(m)[1:] for m in means)
            lines.append(line)
        if self.units:
            scale = ", ".join(f"{t} {a:.2f} / {b:.2f}" for t, (a, b) in self.units.items())
            lines.append(f"raw identity each LoRA adds over the base (1x / 2x): {scale}")
        return "\n".join(lines)


def least_squares(plan: MergePlan, host: Host) -> dict[ModuleRef, ModuleDelta]:
    """Least squares (Mix-of-Show) on the statistics a merge with ``plan``'s options
    records (the same recording run, collected again)."""
    plan = replace(plan, options=plan.options.resolved(host.device))
    out: dict[ModuleRef, ModuleDelta] = {}
    with torch.no_grad(), host.clean_weights():
        modules = host.modules(plan.refs)
        shapes = {ref: flat_shape(m) for ref, m in modules.items()}
        stats = new_stats(plan, shapes, host.device)
        collect(plan, host, modules, stats, SilentProgress())
        for ref, layer in stats.items():
            base = host.base_weight(ref)
            parts = [c.deltas.get(ref) for c in plan.concepts]
            ups = [torch.zeros(base.shape[0], 0) if p is None else p.up.float() for p in parts]
            solution = solve_layer(layer, ups, base, SolverSettings(objective="least_squares"))
            kernel = next(p.kernel for p in parts if p is not None)
            out[ref] = ModuleDelta(solution.up.cpu(), solution.down.cpu(), kernel)
    return out


def methods_for(
    case: Case, files: ToyWorldFiles, host: Host, options: MergeOptions
) -> tuple[list[Deltas], dict[str, Deltas]]:
    """Each concept's own deltas (read by the real reader) and every merge method's."""
    specs = [ConceptSpec(files.loras[c.trigger], c.prompt) for c in case.concepts]
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / f"{options.output}.safetensors"
        plan = plan_merge(specs, options, host.architecture, output, check_shapes=False)
        result = merge(specs, options, output, lambda: host, check_shapes=False)
        ls = least_squares(plan, host)
    methods: dict[str, Deltas] = dict(baselines(plan))
    methods["least squares"] = ls
    methods["loraclr"] = result.factors
    return [c.deltas for c in plan.concepts], methods


def _normalised(value: float, base: float, unit: float) -> float:
    return (value - base) / unit if abs(unit) > 1e-9 else math.nan


def score_rows(
    case: Case,
    protos: Prototypes,
    base: torch.Tensor,
    owns: Sequence[torch.Tensor],
    outputs: Mapping[str, torch.Tensor],
) -> list[Row]:
    """Rows from generated latents ``[P, S, 4, 8, 8]`` (prompts as :meth:`Case.prompts`)."""
    concepts = case.concepts
    n = len(concepts)

    def raw(latents: torch.Tensor, prompt: int, place: int, who: int, noun: str) -> float:
        trig = concepts[who].trigger
        return float(raw_identity(protos, latents[prompt], place, trig, noun).mean())

    def identity(latents: torch.Tensor, i: int, prompt: int, place: int) -> float:
        noun = concepts[i].noun
        b = raw(base, prompt, place, i, noun)
        unit = raw(owns[i], prompt, place, i, noun) - b
        return _normalised(raw(latents, prompt, place, i, noun), b, unit)

    def placements(i: int) -> list[tuple[int, int]]:
        """(prompt, other concept) for every pair that names concept i first (left)."""
        return [(n + k, b) for k, (a, b) in enumerate(case.pairs) if a == i]

    def bleed(latents: torch.Tensor, i: int) -> float:
        values = []
        for prompt, j in placements(i):
            noun_i, noun_j = concepts[i].noun, concepts[j].noun
            b_here = raw(base, prompt, 0, j, noun_i)
            unit = raw(owns[j], j, 0, j, noun_j) - raw(base, j, 0, j, noun_j)
            values.append(_normalised(raw(latents, prompt, 0, j, noun_i), b_here, unit))
        return sum(values) / len(values)

    def joint(latents: torch.Tensor, i: int) -> float:
        values = [identity(latents, i, prompt, 0) for prompt, _ in placements(i)]
        return sum(values) / len(values)

    triggers = [c.trigger for c in concepts]
    zeros = dict.fromkeys(triggers, 0.0)
    rows = [Row("base", dict(zeros), dict(zeros), dict(zeros))]
    for i, c in enumerate(concepts):
        single = {t: (identity(owns[i], i, i, 0) if t == c.trigger else math.nan) for t in triggers}
        joint_i = {t: (joint(owns[i], i) if t == c.trigger else math.nan) for t in triggers}
        rows.append(Row(f"{c.trigger} alone", single, joint_i, dict.fromkeys(triggers, math.nan)))
    for name, latents in outputs.items():
        rows.append(
            Row(
                name,
                {c.trigger: identity(latents, i, i, 0) for i, c in enumerate(concepts)},
                {c.trigger: joint(latents, i) for i, c in enumerate(concepts)},
                {c.trigger: bleed(latents, i) for i, c in enumerate(concepts)},
            )
        )
    return rows


def case_table(case: Case, files: ToyWorldFiles, settings: EvalSettings | None = None) -> CaseTable:
    """Merge the case's LoRAs on the toy model, generate every configuration, score it."""
    from loraclr_ext.hosts.standalone import StandaloneHost

    settings = settings or EvalSettings()
    started = time.perf_counter()
    with threads(1):
        host = StandaloneHost.load(files.model, "cpu")
        alphas = host.pipe.scheduler.alphas_cumprod.float()
        protos = fit_prototypes(build_world())
        owns, methods = methods_for(case, files, host, settings.merge)
        prompts = case.prompts()

        def run(deltas: Deltas) -> torch.Tensor:
            return generate(
                host,
                prompts,
                deltas,
                seeds=settings.seeds,
                steps=settings.steps,
                seed=settings.seed,
                alphas_cumprod=alphas,
            )

        base = run({})
        own_latents = [run(d) for d in owns]
        outputs = {name: run(d) for name, d in methods.items()}
        rows = score_rows(case, protos, base, own_latents, outputs)
        units = identity_units(case, protos, base, own_latents)
    seconds = time.perf_counter() - started
    return CaseTable(case, rows, settings, seconds, units, host.device.type)


def identity_units(
    case: Case, protos: Prototypes, base: torch.Tensor, owns: Sequence[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """Raw identity each concept's own LoRA adds over the base at its place: in its own
    prompt, and averaged over the two-concept prompts that name it first."""
    n = len(case.concepts)
    units = {}
    for i, c in enumerate(case.concepts):

        def gain(prompt: int, place: int, i: int = i, c: ToyConcept = c) -> float:
            own = raw_identity(protos, owns[i][prompt], place, c.trigger, c.noun).mean()
            at_base = raw_identity(protos, base[prompt], place, c.trigger, c.noun).mean()
            return float(own - at_base)

        joint = [gain(n + k, 0) for k, pair in enumerate(case.pairs) if pair[0] == i]
        units[c.trigger] = (gain(i, 0), sum(joint) / len(joint))
    return units
