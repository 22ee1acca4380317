"""Fit small concept LoRAs that behave like trained ones, for the demo and the tests.

A trained character LoRA changes the model a lot for prompts that contain its trigger
word and little for anything else. This module reproduces that in miniature, on any
host: for the trigger prompts the LoRA moves the conditioning at the trigger tokens and
the UNet output towards a fixed random "appearance"; for prompts without the trigger
(other concepts, neutral scenes) it is trained to change nothing. No data, no weights
from anywhere: everything is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraclr_ext.deltas import ModuleDelta
from loraclr_ext.hooks import applied
from loraclr_ext.hosts.base import Host
from loraclr_ext.naming import module_refs
from loraclr_ext.targets import ModuleRef

TRAIN_TEMPLATES = ("{}", "a photo of {}", "{} in a garden", "a portrait of {}")
OTHER_PROMPTS = (
    "a photo of a dog",
    "a photo of a cat",
    "a castle in the style of a painting",
    "a person",
)


@dataclass(frozen=True)
class FitSettings:
    """How hard to fit: rank, Adam steps and learning rate, effect sizes (relative to the
    base outputs' RMS), timesteps (of 1000) and latent size."""

    rank: int = 4
    steps: int = 120
    lr: float = 3e-2
    text_shift: float = 1.0
    unet_shift: float = 0.5
    timesteps: tuple[int, ...] = (300, 700)
    size: int = 64
    seed: int = 0


def concept_refs(host: Host) -> list[ModuleRef]:
    """Text-encoder and UNet transformer modules of the host, as a kohya LoRA trains."""
    wanted = module_refs(host.architecture, ("text", "transformer"))
    return sorted(host.modules(wanted))


def fit_concept(
    host: Host, prompt: str, trigger: str, others: list[str], settings: FitSettings = FitSettings()
) -> dict[ModuleRef, ModuleDelta]:
    """Train a LoRA for ``prompt`` whose effect is tied to the token(s) of ``trigger``.

    Args:
        host: the base model (never modified; the LoRA acts through hooks).
        prompt: the concept prompt, e.g. ``"sks dog"``.
        trigger: the word that carries the concept, e.g. ``"sks"``.
        others: prompts the LoRA must leave unchanged (other concepts, neutral scenes).

    Returns:
        Exact deltas ``up [out, r] @ down [r, in]`` per module (scale folded in).
    """
    g = torch.Generator().manual_seed(settings.seed)
    refs = concept_refs(host)
    modules = host.modules(refs)
    params = {}
    for ref in refs:
        w = host.base_weight(ref)
        down = torch.randn(settings.rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
        params[ref] = (torch.zeros(w.shape[0], settings.rank), down)
    trainable = [t for pair in params.values() for t in pair]
    for t in trainable:
        t.requires_grad_(True)

    positives = [t.format(prompt) for t in TRAIN_TEMPLATES]
    negatives = list(others) + list(OTHER_PROMPTS)
    trig_ids = set(host.tokenize([trigger]).ids[0][1:-1])
    mask = _positions(host, positives, trig_ids)  # [B, T]
    latents = torch.randn(len(positives), 4, settings.size // 8, settings.size // 8, generator=g)
    neg_latents = torch.randn(
        len(negatives), 4, settings.size // 8, settings.size // 8, generator=g
    )
    with torch.no_grad():
        base_pos = host.encode(positives).context.float()
        base_neg = host.encode(negatives).context.float()
        text_dir = torch.randn(base_pos.shape[-1], generator=g)
        text_target = base_pos + mask[..., None] * text_dir * settings.text_shift * base_pos.std()
        eps_targets, eps_neg = [], []
        for t in settings.timesteps:
            eps = host.predict_noise(latents, t, _cond(host, positives)).float()
            look = torch.randn(eps.shape[1:], generator=g)
            eps_targets.append(eps + settings.unet_shift * eps.std() * look)
            eps_neg.append(host.predict_noise(neg_latents, t, _cond(host, negatives)).float())

    deltas = {ref: ModuleDelta(up, down) for ref, (up, down) in params.items()}
    optimizer = torch.optim.Adam(trainable, lr=settings.lr)
    for _ in range(settings.steps):
        optimizer.zero_grad()
        with applied(modules, deltas):
            cond_pos = host.encode(positives)
            cond_neg = host.encode(negatives)
            loss = _mse(cond_pos.context, text_target) * 4 + _mse(cond_neg.context, base_neg)
            for k, t in enumerate(settings.timesteps):
                loss = loss + _mse(host.predict_noise(latents, t, cond_pos), eps_targets[k])
                loss = loss + _mse(host.predict_noise(neg_latents, t, cond_neg), eps_neg[k])
        loss.backward()
        optimizer.step()
    return {
        ref: ModuleDelta(up.detach().clone(), down.detach().clone(), _kernel(modules[ref]))
        for ref, (up, down) in params.items()
    }


def _positions(host: Host, prompts: list[str], ids: set[int]) -> torch.Tensor:
    tokens = host.tokenize(prompts)
    mask = torch.zeros(len(prompts), tokens.length)
    for b, row in enumerate(tokens.ids):
        for t, token in enumerate(row[: tokens.length]):
            if token in ids:
                mask[b, t] = 1.0
    return mask


def _cond(host: Host, prompts: list[str]):  # noqa: ANN202
    return host.encode(prompts)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-12)


def _kernel(module: torch.nn.Module) -> tuple[int, int] | None:
    weight = module.weight
    return tuple(weight.shape[2:]) if weight.ndim == 4 else None
