"""Fit small concept LoRAs that behave like trained ones, for the demo and the tests.

A trained character LoRA changes the model a lot where its trigger word appears and
little elsewhere. This module fits such a LoRA on any host, from the base model's own
activations, one layer at a time and in closed form (ridge least squares, then the best
rank-``r`` approximation):

* text-encoder layers and cross-attention K/V: rows of the concept's prompts at its
  trigger tokens are moved along a fixed random output direction; every other row (the
  template words, padding, other concepts' prompts, neutral prompts) must stay put;
* the other UNet transformer layers get a small random change, as a style component
  that bleeds into every prompt like a real LoRA's does.

Nothing is downloaded or trained on data; everything is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraclr_ext.hosts.base import Host
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.naming import module_refs
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.collect import token_roles
from loraclr_ext.pipeline.hooks import applied, recording
from loraclr_ext.pipeline.plan import is_cross_kv

TRAIN_TEMPLATES = ("{}", "a photo of {}", "{} in a garden", "a portrait of {}", "a painting of {}")
FIT_NEUTRAL_PROMPTS = (
    "a photo of a dog",
    "a photo of a cat",
    "a castle in the style of a painting",
    "a person",
    "a man and a woman in the city",
    "a portrait of the man",
    "a landscape with a house",
    "the woman in a garden at night",
)


@dataclass(frozen=True)
class FitSettings:
    """Rank, effect sizes (relative to each layer's output RMS at the trigger tokens),
    the relative ridge of the per-layer fit, and the seed."""

    rank: int = 4
    text_shift: float = 0.5
    kv_shift: float = 2.0
    style: float = 0.005
    ridge: float = 1e-1
    seed: int = 0


def concept_refs(host: Host) -> list[ModuleRef]:
    """Text-encoder and UNet transformer modules of the host, as a kohya LoRA trains."""
    wanted = module_refs(host.architecture, ("text", "transformer"))
    return sorted(host.modules(wanted))


def fit_concept(
    host: Host, prompt: str, trigger: str, others: list[str], settings: FitSettings = FitSettings()
) -> dict[ModuleRef, ModuleDelta]:
    """Fit a LoRA for ``prompt`` whose effect is tied to the token(s) of ``trigger``.

    Args:
        host: the base model (never modified).
        prompt: the concept prompt, e.g. ``"sks dog"``.
        trigger: the word that carries the concept, e.g. ``"sks"``.
        others: prompts the LoRA must leave unchanged (other concepts, neutral scenes).

    Returns:
        Exact deltas ``up [out, r] @ down [r, in]`` per module.
    """
    g = torch.Generator().manual_seed(settings.seed)
    refs = concept_refs(host)
    modules = host.modules(refs)
    positives = [t.format(prompt) for t in TRAIN_TEMPLATES]
    negatives = [t.format(o) for o in others for t in TRAIN_TEMPLATES] + list(FIT_NEUTRAL_PROMPTS)
    prompts = positives + negatives
    trig_ids = set(host.tokenize([trigger]).ids[0][1:-1])
    trigger_rows = token_roles(host, positives, trig_ids).trigger  # [P, T]
    others_rows = trigger_rows.new_zeros(len(negatives), trigger_rows.shape[1])
    flat_mask = torch.cat([trigger_rows, others_rows]).reshape(-1)

    deltas: dict[ModuleRef, ModuleDelta] = {}
    text = {r: m for r, m in modules.items() if r.is_text}
    rows: dict[ModuleRef, list[torch.Tensor]] = {r: [] for r in text}
    with torch.no_grad():
        # Layer by layer would follow the LoRA's own cascade; one pass on the base model
        # is close enough for a fixture and keeps the fit instant.
        with recording(text, lambda ref, x, w: rows[ref].append(x.float().cpu())):
            host.encode(prompts)
        for ref in text:
            deltas[ref] = _fit_layer(
                host, ref, torch.cat(rows[ref]), flat_mask, settings.text_shift, settings, g
            )
        with applied(modules, deltas):
            context = host.encode(prompts).context.float().cpu()
        ctx_rows = context.reshape(-1, context.shape[-1])
        for ref in (r for r in modules if is_cross_kv(r)):
            deltas[ref] = _fit_layer(host, ref, ctx_rows, flat_mask, settings.kv_shift, settings, g)
        for ref in (r for r in modules if r.component == "unet" and not is_cross_kv(r)):
            deltas[ref] = _style(host, ref, modules[ref], settings, g)
    return deltas


def _fit_layer(
    host: Host,
    ref: ModuleRef,
    x: torch.Tensor,
    trigger: torch.Tensor,
    shift: float,
    settings: FitSettings,
    g: torch.Generator,
) -> ModuleDelta:
    """Rank-``r`` ``ΔW`` moving trigger rows of ``x [t, in]`` along one direction, others not."""
    w0 = host.base_weight(ref).double()
    x = x.double()
    direction = torch.randn(w0.shape[0], generator=g, dtype=torch.float64)
    direction /= direction.norm()
    out_rms = (x[trigger] @ w0.T).pow(2).mean().sqrt() * w0.shape[0] ** 0.5
    target = torch.zeros(x.shape[0], w0.shape[0], dtype=torch.float64)
    target[trigger] = shift * out_rms * direction
    weight = torch.where(trigger, 20.0, 1.0).double()[:, None]  # few trigger rows vs many others
    gram = (x * weight).T @ x
    gram += settings.ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    dense = torch.linalg.solve(gram, (x * weight).T @ target).T  # [out, in]
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    r = min(settings.rank, int((s > 1e-9 * s.max()).sum()))
    root = s[:r].sqrt()
    return ModuleDelta((u[:, :r] * root).float(), (root[:, None] * vh[:r]).float())


def _style(
    host: Host, ref: ModuleRef, module: torch.nn.Module, settings: FitSettings, g: torch.Generator
) -> ModuleDelta:
    """A small random rank-``r`` change of ``settings.style`` times the weight's norm."""
    w0 = host.base_weight(ref)
    up = torch.randn(w0.shape[0], settings.rank, generator=g)
    down = torch.randn(settings.rank, w0.shape[1], generator=g)
    scale = settings.style * float(w0.norm()) / float((up @ down).norm())
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    kernel = (int(weight.shape[2]), int(weight.shape[3])) if weight.ndim == 4 else None
    return ModuleDelta(up * scale**0.5, down * scale**0.5, kernel)
