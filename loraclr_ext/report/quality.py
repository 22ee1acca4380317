"""The quality report (design §7): fidelity, isolation and base preservation of the merge,
against the baselines, on held-out prompts, at the text conditioning and the UNet output,
and composition on prompts that name two concepts together (``report.joint``).

All errors are relative to each LoRA's own effect: ``|merged − own| / |own − base|``, so
0 is a perfect copy of the concept's LoRA and 1 is as far off as not applying it at all.
Shares (leak, bleed) are least-squares coefficients on the concepts' effects
(``report.shares``): stacking ≈ 1, averaging n LoRAs ≈ 1/n, no bleed = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loraclr_ext.hosts.base import Conditioning, Host
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.collect import token_roles, trigger_ids
from loraclr_ext.pipeline.hooks import applied
from loraclr_ext.pipeline.options import HELD_OUT_TEMPLATES, JOINT_TEMPLATES, NEUTRAL_PROMPTS
from loraclr_ext.pipeline.plan import MergePlan
from loraclr_ext.pipeline.progress import Progress, check_interrupt
from loraclr_ext.report.joint import JointScore, evaluate_joint
from loraclr_ext.report.shares import Gram

REPORT_TIMESTEP = 600
"""Training timestep (of 1000) of the UNet comparison: mid-noise, where identity forms."""
REPORT_SIZE = 256
"""Largest image size (px) of the report's UNet evaluation."""
HELD_OUT_PER_CONCEPT = 1
"""Held-out prompts per concept (the first of ``HELD_OUT_TEMPLATES``)."""
NEUTRAL_COUNT = 2
"""Neutral prompts for base preservation (the first of ``NEUTRAL_PROMPTS``)."""
REPORT_BATCH = 8
"""Most prompts per UNet call of the report."""


def report_size(recording_size: int) -> int:
    """Image size of the report: half the recording run's (a multiple of 64, at least 128,
    at most ``REPORT_SIZE``) and never above it. Every method is scored on the same latents,
    so the comparison needs no more detail than that; the UNet costs ~4× less per halving."""
    half = recording_size // 2 // 64 * 64
    return min(recording_size, REPORT_SIZE, max(128, half))


def report_prompts(plan: MergePlan) -> tuple[list[str], int]:
    """Every prompt the report runs, in one list: ``HELD_OUT_PER_CONCEPT`` held-out prompts
    per concept (in concept order), then the neutral prompts; and the neutral ones' start."""
    held_out = [
        t.format(c.prompt) for c in plan.concepts for t in HELD_OUT_TEMPLATES[:HELD_OUT_PER_CONCEPT]
    ]
    return [*held_out, *NEUTRAL_PROMPTS[:NEUTRAL_COUNT]], len(held_out)


def report_work(plan: MergePlan, methods: int = 4) -> int:
    """UNet image evaluations of the report at :func:`report_size`: the base model and every
    method run on every report prompt; each concept's LoRA alone on its own held-out prompts
    and the neutral ones; the other LoRAs stacked on each concept's held-out prompts. Linear
    in the number of concepts (every LoRA on every prompt would be quadratic: 238 images
    instead of 118 at 12 concepts)."""
    prompts, neutral_start = report_prompts(plan)
    n = len(plan.concepts)
    neutral = len(prompts) - neutral_start
    singles = n * (HELD_OUT_PER_CONCEPT + neutral)
    others = n * HELD_OUT_PER_CONCEPT
    return (1 + methods) * len(prompts) + singles + others


def report_pixels(plan: MergePlan, methods: int = 4) -> int:
    """The report's UNet work in image pixels evaluated, comparable with
    :func:`loraclr_ext.pipeline.collect.recording_pixels` (for progress and ETA weights)."""
    return report_work(plan, methods) * report_size(plan.options.recording[1]) ** 2


Deltas = Mapping[ModuleRef, ModuleDelta]


@dataclass
class ConceptScore:
    """One method's numbers for one concept.

    On the concept's own held-out prompts (lower is better):
        text_trigger: relative error of the conditioning at the trigger tokens.
        text_all: relative error over all conditioning tokens.
        unet: relative error of the UNet output.
        leak: share of the other LoRAs' effect (all of them applied together, as stacking
            them would) that the method's UNet output carries on these prompts (least
            squares on own and others' effects, ``report.shares``): stacking ≈ 1,
            averaging n LoRAs ≈ 1/n, 0 = no bleed, < 0 = pushed away.
    On the joint prompts naming it with another concept, at its own trigger tokens
    (``report.joint``; NaN for a one-concept merge):
        joint_text / joint_kv: relative error of the conditioning / the cross-attention keys
            and values against its LoRA alone on the same prompt (composition fidelity).
        joint_own: share of its own K/V effect kept there (1 = all).
        joint_bleed: share of the partner concept's K/V effect landing there (0 = none).
    """

    concept: str
    text_trigger: float
    text_all: float
    unet: float
    leak: float
    joint_text: float = float("nan")
    joint_kv: float = float("nan")
    joint_own: float = float("nan")
    joint_bleed: float = float("nan")


@dataclass
class MethodScores:
    """A method's per-concept scores and its base preservation.

    ``preservation_text`` / ``preservation_unet``: how far neutral prompts move from the base
    model, in units of one concept LoRA's average effect on them (0 = untouched).
    """

    method: str
    concepts: list[ConceptScore]
    preservation_text: float
    preservation_unet: float

    def mean(self, name: str) -> float:
        """Mean of a :class:`ConceptScore` field over the concepts that have it (NaN where
        none has)."""
        values = [v for c in self.concepts if (v := getattr(c, name)) == v]
        return sum(values) / len(values) if values else float("nan")


@dataclass
class QualityReport:
    """The report of one merge: every method scored on the same prompts and latents."""

    methods: list[MethodScores]
    held_out_templates: list[str] = field(default_factory=lambda: list(HELD_OUT_TEMPLATES))
    joint_prompts: list[str] = field(default_factory=list)

    def method(self, name: str) -> MethodScores:
        return next(m for m in self.methods if m.method == name)

    def to_dict(self) -> dict:
        """Plain JSON data; a measure that does not apply (NaN: no joint prompt for one
        concept, no trigger token of its own) is ``None``, as strict JSON has no NaN."""
        return _json_safe(asdict(self))

    def table(self) -> str:
        """A plain-text table: one row per method and concept, then the means."""
        head = (
            f"{'method':<14} {'concept':<18} {'text@trigger':>12} {'unet':>7} {'leak':>7} "
            f"{'joint kv':>9} {'joint bleed':>11}"
        )
        lines = [head, "-" * len(head)]
        for m in self.methods:
            for c in m.concepts:
                lines.append(
                    f"{m.method:<14} {c.concept[:18]:<18} {c.text_trigger:>12.3f} "
                    f"{c.unet:>7.3f} {c.leak:>7.3f} {c.joint_kv:>9.3f} {c.joint_bleed:>11.3f}"
                )
        lines.append("")
        lines.append(
            f"{'method':<14} {'mean text@trig':>14} {'mean unet':>10} {'mean leak':>9} "
            f"{'joint kv':>9} {'joint bleed':>11} {'base moved (text/unet)':>24}"
        )
        for m in self.methods:
            lines.append(
                f"{m.method:<14} {m.mean('text_trigger'):>14.3f} {m.mean('unet'):>10.3f} "
                f"{m.mean('leak'):>9.3f} {m.mean('joint_kv'):>9.3f} "
                f"{m.mean('joint_bleed'):>11.3f} "
                f"{m.preservation_text:>11.3f} / {m.preservation_unet:.3f}"
            )
        return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def stacked(
    deltas: Sequence[Deltas], refs: list[ModuleRef], scale: float = 1.0
) -> dict[ModuleRef, ModuleDelta]:
    """``scale · Σ ΔW_i`` over ``deltas`` as exact concatenated factors (kohya's concat merge):
    ``up [out, Σr]``, ``down [Σr, in]``, for each of ``refs`` that any of them has."""
    out: dict[ModuleRef, ModuleDelta] = {}
    for ref in refs:
        parts = [d[ref] for d in deltas if ref in d]
        if not parts:
            continue
        up = torch.cat([p.up.float() for p in parts], dim=1)
        down = torch.cat([p.down.float() for p in parts])
        out[ref] = ModuleDelta(up, down * scale, parts[0].kernel)
    return out


def baselines(plan: MergePlan) -> dict[str, dict[ModuleRef, ModuleDelta]]:
    """Stacking (= kohya concat, exact ΣΔW_i) and averaging, as exact concatenated factors."""
    deltas = [c.deltas for c in plan.concepts]
    refs = list(plan.refs)
    return {"stacked": stacked(deltas, refs), "average": stacked(deltas, refs, 1 / len(deltas))}


@dataclass
class _Outputs:
    cond: Conditioning
    eps: torch.Tensor


def _run(
    host: Host,
    modules: Mapping[ModuleRef, torch.nn.Module],
    deltas: Deltas,
    prompts: list[str],
    latents: torch.Tensor,
) -> _Outputs:
    """One configuration on ``prompts``: conditioning and UNet output, in batches."""
    text = {r: d for r, d in deltas.items() if r.is_text}
    unet = {r: d for r, d in deltas.items() if not r.is_text}
    contexts, eps = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), REPORT_BATCH):
            chunk = prompts[start : start + REPORT_BATCH]
            with applied(modules, text):
                cond = host.encode(chunk)
            with applied(modules, unet):
                out = host.predict_noise(latents[start : start + len(chunk)], REPORT_TIMESTEP, cond)
            contexts.append(cond.context.float().cpu())
            eps.append(out.float().cpu())
    return _Outputs(Conditioning(torch.cat(contexts), None), torch.cat(eps))


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    """``|a − b| / |b − ref|``."""
    return float((a - b).norm() / (b - ref).norm().clamp_min(1e-12))


def _leak(out: torch.Tensor, own: torch.Tensor, others: torch.Tensor, base: torch.Tensor) -> float:
    """The others' share of ``out − base`` next to the concept's own (``report.shares``)."""
    gram = Gram()
    gram.add(out - base, own - base, others)
    return gram.shares().others


def evaluate(
    plan: MergePlan,
    host: Host,
    modules: Mapping[ModuleRef, torch.nn.Module],
    merged: Deltas,
    least_squares: Deltas,
    progress: Progress,
) -> QualityReport:
    """Score the merge and the baselines on held-out and neutral prompts, and on joint
    prompts naming two concepts together.

    The base model and every method run on every report prompt, each concept's LoRA
    alone on its own held-out and the neutral prompts, and the other LoRAs stacked on each
    concept's held-out prompts (batched): :func:`report_work` UNet evaluations at
    :func:`report_size`, one progress step per configuration. The joint measure runs only
    the text encoders and the K/V projections (one more step).
    """
    methods: dict[str, Deltas] = {"loraclr": merged}
    if least_squares:
        methods["least squares"] = least_squares
    methods.update(baselines(plan))
    concepts = plan.concepts
    n = len(concepts)
    triggers = trigger_ids(host, concepts)
    size = report_size(plan.options.recording[1])
    prompts, neutral_start = report_prompts(plan)
    gen = torch.Generator().manual_seed(plan.options.seed + 1)
    latents = torch.randn(len(prompts), 4, size // 8, size // 8, generator=gen)
    latents = latents.to(host.device, host.dtype)
    progress.stage("Measuring quality", 1 + 2 * n + len(methods) + 1)

    def run(deltas: Deltas, rows: list[int]) -> _Outputs:
        check_interrupt(progress)
        out = _run(host, modules, deltas, [prompts[r] for r in rows], latents[rows])
        progress.advance()
        return out

    per = HELD_OUT_PER_CONCEPT
    everywhere = list(range(len(prompts)))
    neutral = everywhere[neutral_start:]
    held = [list(range(i * per, (i + 1) * per)) for i in range(n)]
    base = run({}, everywhere)
    owns = [run(c.deltas, held[i] + neutral) for i, c in enumerate(concepts)]
    refs = list(plan.refs)
    others = [
        run(stacked([c.deltas for j, c in enumerate(concepts) if j != i], refs), held[i])
        for i in range(n)
    ]
    outputs = {name: run(deltas, everywhere) for name, deltas in methods.items()}

    scores: dict[str, list[ConceptScore]] = {m: [] for m in methods}
    for i, concept in enumerate(concepts):
        rows = slice(i * per, (i + 1) * per)
        trig = token_roles(host, prompts[rows], triggers[i]).trigger
        own = _rows(owns[i], slice(None, per))  # its held-out rows
        b_eps = base.eps[rows]
        bleed = others[i].eps - b_eps
        for name, out in outputs.items():
            t_m, t_b = (x.cond.context[rows][trig] for x in (out, base))
            t_o = own.cond.context[trig]
            leak = _leak(out.eps[rows], own.eps, bleed, b_eps)
            scores[name].append(
                ConceptScore(
                    concept=concept.name,
                    text_trigger=_rel(t_m, t_o, t_b) if trig.any() else float("nan"),
                    text_all=_rel(
                        out.cond.context[rows], own.cond.context, base.cond.context[rows]
                    ),
                    unet=_rel(out.eps[rows], own.eps, b_eps),
                    leak=leak,
                )
            )
    joint = evaluate_joint(
        host,
        modules,
        [c.prompt for c in concepts],
        triggers,
        [c.deltas for c in concepts],
        methods,
        check=lambda: check_interrupt(progress),
    )
    progress.advance()
    for name, per_concept in joint.items():
        for score, composed in zip(scores[name], per_concept, strict=True):
            _set_joint(score, composed)
    after = slice(neutral_start, None)
    preservation = _preservation(
        _rows(base, after),
        [_rows(o, slice(per, None)) for o in owns],
        {name: _rows(out, after) for name, out in outputs.items()},
    )
    return QualityReport(
        [MethodScores(m, scores[m], *preservation[m]) for m in methods],
        held_out_templates=list(HELD_OUT_TEMPLATES[:per]),
        joint_prompts=list(JOINT_TEMPLATES) if joint else [],
    )


def _set_joint(score: ConceptScore, joint: JointScore) -> None:
    score.joint_text = joint.text
    score.joint_kv = joint.kv
    score.joint_own = joint.own
    score.joint_bleed = joint.bleed


def _rows(out: _Outputs, rows: slice) -> _Outputs:
    """The prompts ``rows`` of ``out``."""
    return _Outputs(Conditioning(out.cond.context[rows], None), out.eps[rows])


def _preservation(
    base: _Outputs, singles: list[_Outputs], outputs: Mapping[str, _Outputs]
) -> dict[str, tuple[float, float]]:
    """How far each method moves the neutral prompts' outputs (all rows given) from the
    base, in units of one concept LoRA's average effect on them (text, UNet)."""

    def moved(out: _Outputs) -> tuple[float, float]:
        text = float((out.cond.context - base.cond.context).norm())
        return text, float((out.eps - base.eps).norm())

    units = [moved(s) for s in singles]
    unit_text = sum(u[0] for u in units) / len(units)
    unit_eps = sum(u[1] for u in units) / len(units)
    result = {}
    for name, out in outputs.items():
        text, eps = moved(out)
        result[name] = (text / max(unit_text, 1e-12), eps / max(unit_eps, 1e-12))
    return result
