"""The quality report (design §7): fidelity, isolation and base preservation of the merge,
against the baselines, on held-out prompts, at the text conditioning and the UNet output.

All errors are relative to each LoRA's own effect: ``|merged − own| / |own − base|``, so
0 is a perfect copy of the concept's LoRA and 1 is as far off as not applying it at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from loraclr_ext.hosts.base import Conditioning, Host
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.collect import token_roles, trigger_ids
from loraclr_ext.pipeline.hooks import applied
from loraclr_ext.pipeline.options import HELD_OUT_TEMPLATES, NEUTRAL_PROMPTS
from loraclr_ext.pipeline.plan import MergePlan
from loraclr_ext.pipeline.progress import Progress, check_interrupt

REPORT_TIMESTEP = 600
"""Training timestep (of 1000) of the UNet comparison: mid-noise, where identity forms."""
REPORT_SIZE = 256
"""Largest image size (px) of the report's UNet evaluation."""

Deltas = Mapping[ModuleRef, ModuleDelta]


@dataclass
class ConceptScore:
    """One method's numbers for one concept (lower is better).

    Attributes:
        text_trigger: relative error of the conditioning at the trigger tokens.
        text_all: relative error over all 77 conditioning tokens.
        unet: relative error of the UNet output.
        leak: isolation, as the share of the other LoRAs' effect on concept i's prompts that
            the method carries over, at the UNet output: ``⟨merged − own_i, E⟩ / ‖E‖²`` with
            ``E = Σ_{j≠i} (own_j − base)`` on concept i's prompts. Stacking ≈ 1 (it applies
            them all), 0 = no bleed.
    """

    concept: str
    text_trigger: float
    text_all: float
    unet: float
    leak: float


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
        values = [getattr(c, name) for c in self.concepts]
        return sum(values) / len(values)


@dataclass
class QualityReport:
    """The report of one merge: every method scored on the same prompts and latents."""

    methods: list[MethodScores]
    held_out_templates: list[str] = field(default_factory=lambda: list(HELD_OUT_TEMPLATES))

    def method(self, name: str) -> MethodScores:
        return next(m for m in self.methods if m.method == name)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table: one row per method and concept, then the means."""
        head = (
            f"{'method':<14} {'concept':<18} {'text@trigger':>12} {'text@all':>9} "
            f"{'unet':>7} {'leak':>7}"
        )
        lines = [head, "-" * len(head)]
        for m in self.methods:
            for c in m.concepts:
                lines.append(
                    f"{m.method:<14} {c.concept[:18]:<18} {c.text_trigger:>12.3f} "
                    f"{c.text_all:>9.3f} {c.unet:>7.3f} {c.leak:>7.3f}"
                )
        lines.append("")
        lines.append(
            f"{'method':<14} {'mean text@trig':>14} {'mean unet':>10} {'mean leak':>9} "
            f"{'base moved (text/unet)':>24}"
        )
        for m in self.methods:
            lines.append(
                f"{m.method:<14} {m.mean('text_trigger'):>14.3f} {m.mean('unet'):>10.3f} "
                f"{m.mean('leak'):>9.3f} {m.preservation_text:>11.3f} / {m.preservation_unet:.3f}"
            )
        return "\n".join(lines)


def baselines(plan: MergePlan) -> dict[str, dict[ModuleRef, ModuleDelta]]:
    """Stacking (= kohya concat, exact ΣΔW_i) and averaging, as exact concatenated factors."""
    refs = plan.refs
    n = len(plan.concepts)
    out: dict[str, dict[ModuleRef, ModuleDelta]] = {"stacked": {}, "average": {}}
    for ref in refs:
        parts = [c.deltas[ref] for c in plan.concepts if ref in c.deltas]
        up = torch.cat([p.up.float() for p in parts], dim=1)
        down = torch.cat([p.down.float() for p in parts])
        out["stacked"][ref] = ModuleDelta(up, down, parts[0].kernel)
        out["average"][ref] = ModuleDelta(up, down / n, parts[0].kernel)
    return out


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
    text = {r: d for r, d in deltas.items() if r.is_text}
    unet = {r: d for r, d in deltas.items() if not r.is_text}
    with torch.no_grad():
        with applied(modules, text):
            cond = host.encode(prompts)
        with applied(modules, unet):
            eps = host.predict_noise(latents, REPORT_TIMESTEP, cond)
    return _Outputs(Conditioning(cond.context.float().cpu(), None), eps.float().cpu())


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    """``|a − b| / |b − ref|``."""
    return float((a - b).norm() / (b - ref).norm().clamp_min(1e-12))


def evaluate(
    plan: MergePlan,
    host: Host,
    modules: Mapping[ModuleRef, torch.nn.Module],
    merged: Deltas,
    least_squares: Deltas,
    progress: Progress,
) -> QualityReport:
    """Score the merge and the baselines on held-out prompts (see module docstring)."""
    methods: dict[str, Deltas] = {"loraclr": merged}
    if least_squares:
        methods["least squares"] = least_squares
    methods.update(baselines(plan))
    concepts = plan.concepts
    n = len(concepts)
    triggers = trigger_ids(host, concepts)
    size = min(plan.options.size, REPORT_SIZE)
    gen = torch.Generator().manual_seed(plan.options.seed + 1)
    progress.stage("Measuring quality", n + 1)
    scores: dict[str, list[ConceptScore]] = {m: [] for m in methods}
    for i, concept in enumerate(concepts):
        check_interrupt(progress)
        prompts = [t.format(concept.prompt) for t in HELD_OUT_TEMPLATES]
        latents = torch.randn(len(prompts), 4, size // 8, size // 8, generator=gen)
        latents = latents.to(host.device, host.dtype)
        trig = token_roles(host, prompts, triggers[i]).trigger
        base = _run(host, modules, {}, prompts, latents)
        owns = [_run(host, modules, c.deltas, prompts, latents) for c in concepts]
        own = owns[i]
        bleed = sum(owns[j].eps - base.eps for j in range(n) if j != i)
        for name, deltas in methods.items():
            out = _run(host, modules, deltas, prompts, latents)
            t_m, t_o, t_b = (x.cond.context[trig] for x in (out, own, base))
            leak = float(((out.eps - own.eps) * bleed).sum() / bleed.pow(2).sum().clamp_min(1e-24))
            scores[name].append(
                ConceptScore(
                    concept=concept.name,
                    text_trigger=_rel(t_m, t_o, t_b) if trig.any() else float("nan"),
                    text_all=_rel(out.cond.context, own.cond.context, base.cond.context),
                    unet=_rel(out.eps, own.eps, base.eps),
                    leak=leak,
                )
            )
        progress.advance()
    preservation = _preservation(plan, host, modules, methods, gen, size)
    progress.advance()
    return QualityReport([MethodScores(m, scores[m], *preservation[m]) for m in methods])


def _preservation(
    plan: MergePlan,
    host: Host,
    modules: Mapping[ModuleRef, torch.nn.Module],
    methods: Mapping[str, Deltas],
    gen: torch.Generator,
    size: int,
) -> dict[str, tuple[float, float]]:
    prompts = list(NEUTRAL_PROMPTS)
    latents = torch.randn(len(prompts), 4, size // 8, size // 8, generator=gen).to(
        host.device, host.dtype
    )
    base = _run(host, modules, {}, prompts, latents)
    singles = [_run(host, modules, c.deltas, prompts, latents) for c in plan.concepts]
    unit_text = sum(float((s.cond.context - base.cond.context).norm()) for s in singles) / len(
        singles
    )
    unit_eps = sum(float((s.eps - base.eps).norm()) for s in singles) / len(singles)
    result = {}
    for name, deltas in methods.items():
        out = _run(host, modules, deltas, prompts, latents)
        result[name] = (
            float((out.cond.context - base.cond.context).norm()) / max(unit_text, 1e-12),
            float((out.eps - base.eps).norm()) / max(unit_eps, 1e-12),
        )
    return result
