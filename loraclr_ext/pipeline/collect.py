"""Run every concept through the host and stream layer inputs into solver statistics.

Design §2.2: concept i's inputs are recorded while the base model with concept i's whole
LoRA applied (by hooks) processes concept i's prompts — the text encoders on the fit
templates, the cross-attention K/V layers on the resulting conditioning, every other
UNet layer during a short seeded denoising run. All concepts use the same templates,
seed and timesteps, so their features align position by position. Several concepts share
one denoising batch, each on its own latents with only its own LoRA (a concept's result
is the same as alone, up to the float order of a larger batch).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from loraclr_ext.hosts.base import Conditioning, Host
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.hooks import (
    Blocks,
    RowSink,
    applied,
    applied_in_blocks,
    recording,
    recording_in_blocks,
)
from loraclr_ext.pipeline.options import NEUTRAL_PROMPTS, TEMPLATES, MergeOptions
from loraclr_ext.pipeline.plan import Concept, MergePlan, is_cross_kv
from loraclr_ext.pipeline.progress import Progress, check_interrupt
from loraclr_ext.solver import NEUTRAL, LayerStats

DENSE_LIMIT = 3072
"""With ``subspace="full"``, layers wider than this (flattened inputs) still keep their
statistics in the span of the concepts' down factors, so a 5120-wide SDXL feed-forward
costs O(R²) memory instead of 100 MB."""
SPATIAL_PROMPTS = 2
"""Fit templates conditioning each concept's share of the recording run."""
RECORDING_PIXELS = 8 * 256**2
"""Image pixels per recording UNet call (unless the host's ``max_batch`` is lower): 8
latents at 256 px, i.e. 4 concepts side by side, and 2 at 512 px (one concept). Bounded in
pixels, one call's activations stay flat when the size doubles. An SD 1.5 UNet on a CPU
takes 1.96 s per 256 px latent at 8 per call and 2.58 s at 2."""


@dataclass
class TokenRoles:
    """Per prompt of a batch, which positions are trigger, prompt or padding ``[B, T]``."""

    trigger: torch.Tensor  # bool
    content: torch.Tensor  # bool: BOS .. EOS inclusive

    def weights(self, options: MergeOptions) -> torch.Tensor:
        """Fit weights ``[B, T]``: trigger tokens count more, padding after EOS less."""
        w = torch.full(self.trigger.shape, options.padding_weight)
        w[self.content] = 1.0
        w[self.trigger] = options.trigger_weight
        return w


def trigger_ids(host: Host, concepts: list[Concept]) -> list[set[int]]:
    """Token ids of each concept's prompt that no other concept's prompt contains."""
    ids = [set(host.tokenize([c.prompt]).ids[0][1:-1]) for c in concepts]
    return [
        own - set().union(*(o for j, o in enumerate(ids) if j != i)) for i, own in enumerate(ids)
    ]


def token_roles(host: Host, prompts: list[str], triggers: set[int]) -> TokenRoles:
    tokens = host.tokenize(prompts)
    trigger = torch.zeros(len(prompts), tokens.length, dtype=torch.bool)
    content = torch.zeros_like(trigger)
    for b, ids in enumerate(tokens.ids):
        n = min(len(ids), tokens.length)
        content[b, :n] = True
        for t, token in enumerate(ids[:n]):
            if token in triggers:
                trigger[b, t] = True
    return TokenRoles(trigger, content)


def recording_pixels(plan: MergePlan) -> int:
    """UNet work of the recording run, in image pixels evaluated: every concept (and the
    neutral prompts when preservation is on) runs ``steps`` denoising steps on
    ``SPATIAL_PROMPTS`` images of ``size``² (the text stage is small beside it)."""
    options = plan.options
    runs = len(plan.concepts) + (1 if options.preserve > 0 else 0)
    return runs * (options.steps or 0) * SPATIAL_PROMPTS * (options.size or 0) ** 2


def fit_prompts(prompt: str) -> list[str]:
    return [template.format(prompt) for template in TEMPLATES]


def new_stats(
    plan: MergePlan,
    shapes: Mapping[ModuleRef, tuple[int, int]],
    device: torch.device,
    refs: Sequence[ModuleRef] | None = None,
) -> dict[ModuleRef, LayerStats]:
    """One accumulator per target layer (``refs``, default all of the plan's); a concept
    that lacks the layer has rank 0 there."""
    stats = {}
    for ref in refs if refs is not None else plan.refs:
        fan_in = shapes[ref][1]
        downs = [
            c.deltas[ref].down if ref in c.deltas else torch.zeros(0, fan_in) for c in plan.concepts
        ]
        basis = None if basis_rows(plan, ref, fan_in) is None else down_span(downs)
        stats[ref] = LayerStats(downs, basis=basis, seed=plan.options.seed, device=device)
    return stats


def basis_rows(plan: MergePlan, ref: ModuleRef, fan_in: int) -> int | None:
    """At most how many rows the layer's statistics basis has (``None``: no basis, the
    statistics are over all ``fan_in`` inputs)."""
    if plan.options.subspace == "full" and fan_in <= DENSE_LIMIT:
        return None
    ranks = sum(c.deltas[ref].rank for c in plan.concepts if ref in c.deltas)
    return min(ranks, fan_in)


def recording_steps(plan: MergePlan, refs: Collection[ModuleRef]) -> int:
    """Progress steps of recording ``refs``: per concept one for the text stage, plus the
    denoising steps when any of them is a UNet layer recorded by the denoising run."""
    spatial = any(r.component == "unet" and not is_cross_kv(r) for r in refs)
    return (1 + (plan.options.recording[0] if spatial else 0)) * len(plan.concepts)


def down_span(downs: list[torch.Tensor]) -> torch.Tensor:
    """Orthonormal rows ``[k, in]`` spanning every concept's down factor (k ≤ Σ r_i)."""
    stacked = torch.cat([d.detach().cpu().double() for d in downs])  # [R, in], fp64 on the CPU
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    keep = s > 1e-7 * float(s.max()) if s.numel() else s > 0
    return vh[keep].float().to(downs[0].device)


def collect(
    plan: MergePlan,
    host: Host,
    modules: Mapping[ModuleRef, torch.nn.Module],
    stats: Mapping[ModuleRef, LayerStats],
    progress: Progress,
) -> None:
    """Fill ``stats`` by running every concept (and neutral prompts if preservation is on):
    each concept's text stage alone, then the denoising runs of several concepts at once
    (:func:`recording_groups`)."""
    options = plan.options
    triggers = trigger_ids(host, plan.concepts)
    text = {r: m for r, m in modules.items() if r.is_text and r in stats}
    kv = [r for r in stats if is_cross_kv(r)]
    spatial = {
        r: m
        for r, m in modules.items()
        if r.component == "unet" and r in stats and not is_cross_kv(r)
    }
    progress.stage("Recording concept features", recording_steps(plan, stats))
    runs: list[SpatialRun] = []
    for i, concept in enumerate(plan.concepts):
        check_interrupt(progress)
        cond = _text_stage(host, concept, i, triggers[i], text, kv, modules, stats, options)
        progress.advance()
        unet_deltas = {r: d for r, d in concept.deltas.items() if r.component == "unet"}
        runs.append(SpatialRun(i, _recording_batch(cond), unet_deltas))
    if options.preserve > 0:
        cond = _neutral_stage(host, text, kv, stats)
        runs.append(SpatialRun(NEUTRAL, _recording_batch(cond), {}))
    if spatial:
        for group in recording_groups(runs, host.max_batch, options.recording[1]):
            _spatial_stage(host, group, spatial, modules, stats, options, progress)


@dataclass
class SpatialRun:
    """One concept's share of the denoising run: its ``SPATIAL_PROMPTS`` conditionings and
    its UNet deltas (``owner``: the concept's index, or ``NEUTRAL`` with no deltas)."""

    owner: int
    cond: Conditioning
    deltas: Mapping[ModuleRef, ModuleDelta]


def recording_latents(size: int) -> int:
    """Latents per recording UNet call at ``size`` px when the host sets no lower limit:
    ``RECORDING_PIXELS`` worth, at least one concept's ``SPATIAL_PROMPTS``."""
    return max(SPATIAL_PROMPTS, RECORDING_PIXELS // max(size, 1) ** 2)


def recording_groups(
    runs: list[SpatialRun], max_batch: int | None, size: int
) -> list[list[SpatialRun]]:
    """``runs`` in consecutive groups denoised as one batch: as many as fit in
    :func:`recording_latents` and in the host's ``max_batch``, at least one. A group of
    several then always makes one UNet call per step, as
    :class:`~loraclr_ext.pipeline.hooks.Blocks` needs."""
    latents = recording_latents(size)
    if max_batch:
        latents = min(latents, max_batch)
    per_group = max(1, latents // SPATIAL_PROMPTS)
    return [runs[start : start + per_group] for start in range(0, len(runs), per_group)]


def _sink(stats: Mapping[ModuleRef, LayerStats], concept: int) -> RowSink:
    """Route recorded rows of every module to its layer's statistics, as ``concept``."""

    def sink(ref: ModuleRef, rows: torch.Tensor, w: torch.Tensor | None) -> None:
        stats[ref].add(concept, rows, w)

    return sink


def _text_stage(
    host: Host,
    concept: Concept,
    index: int,
    triggers: set[int],
    text: Mapping[ModuleRef, torch.nn.Module],
    kv: list[ModuleRef],
    modules: Mapping[ModuleRef, torch.nn.Module],
    stats: Mapping[ModuleRef, LayerStats],
    options: MergeOptions,
) -> Conditioning:
    prompts = fit_prompts(concept.prompt)
    weights = token_roles(host, prompts, triggers).weights(options)
    text_deltas = {r: d for r, d in concept.deltas.items() if r.is_text}
    with applied(modules, text_deltas), recording(text, _sink(stats, index), lambda: weights):
        cond = host.encode(prompts)
    rows = cond.context.reshape(-1, cond.context.shape[-1])
    for ref in kv:
        stats[ref].add(index, rows, weights.reshape(-1))
    return cond


def _recording_batch(cond: Conditioning) -> Conditioning:
    """The first ``SPATIAL_PROMPTS`` prompts of ``cond``: the batch of the denoising run."""
    pooled = None if cond.pooled is None else cond.pooled[:SPATIAL_PROMPTS]
    return Conditioning(context=cond.context[:SPATIAL_PROMPTS], pooled=pooled)


def _spatial_stage(
    host: Host,
    group: list[SpatialRun],
    spatial: Mapping[ModuleRef, torch.nn.Module],
    modules: Mapping[ModuleRef, torch.nn.Module],
    stats: Mapping[ModuleRef, LayerStats],
    options: MergeOptions,
    progress: Progress,
) -> None:
    """One denoising run of ``group``'s concepts side by side, each from the same noise
    and each with its own LoRA; a step advances the progress by the group's concepts."""
    blocks = Blocks([r.owner for r in group], [r.deltas for r in group], SPATIAL_PROMPTS)
    batch = Conditioning.concat([r.cond for r in group])
    concepts = sum(r.owner != NEUTRAL for r in group)

    def step(i: int, total: int) -> None:
        progress.advance(concepts)
        check_interrupt(progress)

    with (
        applied_in_blocks(modules, blocks),
        recording_in_blocks(spatial, blocks, lambda owner: _sink(stats, owner)),
    ):
        steps, size = options.recording
        host.sample(
            batch,
            steps=steps,
            size=size,
            seed=options.seed,
            callback=step,
            noise_period=SPATIAL_PROMPTS,
        )


def _neutral_stage(
    host: Host,
    text: Mapping[ModuleRef, torch.nn.Module],
    kv: list[ModuleRef],
    stats: Mapping[ModuleRef, LayerStats],
) -> Conditioning:
    """The neutral prompts' text stage (recorded as ``NEUTRAL``); returns their
    conditioning for the denoising run."""
    with recording(text, _sink(stats, NEUTRAL)):
        cond = host.encode(list(NEUTRAL_PROMPTS))
    rows = cond.context.reshape(-1, cond.context.shape[-1])
    for ref in kv:
        stats[ref].add(NEUTRAL, rows)
    return cond
