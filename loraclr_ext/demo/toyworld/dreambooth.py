"""DreamBooth-style LoRAs of new concepts on the toy base model, written as kohya files.

As kohya's ``train_network.py`` trains a character: instance images of the concept captioned
with its folder name (``"10_ohwx person"`` → caption ``"ohwx person"``), class images of
the class word that the base model itself generated (prior preservation, ``"1_person"``),
LoRA factors on every text-encoder linear layer and every UNet transformer layer
(attention, feed-forward, ``proj_in``/``proj_out``), ``up`` initialised to zero.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraclr_ext.demo.concept_fit import concept_refs
from loraclr_ext.demo.toyworld.identity import generate
from loraclr_ext.demo.toyworld.train import encode_prompts, loss_weights, noisy, warmup_cosine
from loraclr_ext.demo.toyworld.world import ToyConcept, World, concept_object, render_scene
from loraclr_ext.hosts.standalone import StandaloneHost
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.hooks import is_conv


@dataclass(frozen=True)
class LoraSettings:
    """Rank, data and schedule of one DreamBooth LoRA (alpha = rank: scale 1).

    ``instances`` rendered instance images repeated ``repeats`` times per epoch (kohya's
    folder prefix), ``class_images`` base-model generations of the class word, ``batch``
    instance plus ``batch`` class images per step, ``prior_weight`` on the class loss;
    ``grid`` and ``x0_weight`` as in :class:`~loraclr_ext.demo.toyworld.train.BaseSettings`.
    """

    rank: int = 8
    steps: int = 300
    batch: int = 6
    lr: float = 2e-2
    instances: int = 8
    repeats: int = 10
    class_images: int = 32
    prior_weight: float = 1.0
    sample_steps: int = 10
    grid: int = 10
    x0_weight: float = 100.0
    seed: int = 0


class _Factors(torch.nn.Module):
    """Trainable ``down [r, in]`` (Kaiming-uniform like kohya) and ``up [out, r]`` (zero)."""

    def __init__(self, out_features: int, in_features: int, rank: int, g: torch.Generator):
        super().__init__()
        bound = (1.0 / in_features) ** 0.5 * 3**0.5
        down = (torch.rand(rank, in_features, generator=g) * 2 - 1) * bound
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # a 1×1 conv's input [B, C, H, W]
            hidden = torch.einsum("rc,bchw->brhw", self.down, x)
            return torch.einsum("or,brhw->bohw", self.up, hidden)
        return F.linear(F.linear(x, self.down), self.up)


@contextmanager
def trainable(
    modules: Mapping[ModuleRef, torch.nn.Module], factors: Mapping[ModuleRef, _Factors]
) -> Iterator[None]:
    """Add ``up(down(x))`` to each module's output with gradients on (``pipeline.hooks``
    applies fixed deltas without them)."""
    handles = [
        modules[ref].register_forward_hook(lambda mod, args, out, f=f: out + f(args[0]))
        for ref, f in factors.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def class_images(
    host: StandaloneHost, concept: ToyConcept, settings: LoraSettings, alphas: torch.Tensor
) -> torch.Tensor:
    """``[class_images, 4, 8, 8]`` base-model generations of the bare class word."""
    latents = generate(
        host,
        [concept.noun],
        {},
        seeds=settings.class_images,
        steps=settings.sample_steps,
        seed=settings.seed + 1000,
        alphas_cumprod=alphas,
    )
    return latents[0]


def train_lora(
    host: StandaloneHost, world: World, concept: ToyConcept, settings: LoraSettings
) -> dict[ModuleRef, ModuleDelta]:
    """Train one concept's LoRA on ``host`` (whose weights are never changed); returns the
    exact deltas ``up [out, r] @ down [r, in]`` per module (1×1 convs with kernel (1, 1))."""
    pipe: Any = host.pipe
    g = torch.Generator().manual_seed(settings.seed)
    alphas = pipe.scheduler.alphas_cumprod.float()
    priors = class_images(host, concept, settings, alphas)
    instances = torch.stack(
        [render_scene(world, [concept_object(concept)], g) for _ in range(settings.instances)]
    )
    refs = concept_refs(host)
    modules = host.modules(refs)
    factors = {}
    for ref in modules:
        weight = host.base_weight(ref)
        factors[ref] = _Factors(weight.shape[0], weight.shape[1], settings.rank, g)
    params = [p for f in factors.values() for p in f.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, settings.steps))
    frozen = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    prompts = [concept.prompt] * settings.batch + [concept.noun] * settings.batch
    try:
        with trainable(modules, factors):
            for _ in range(settings.steps):
                pick_i = torch.randint(len(instances), (settings.batch,), generator=g)
                pick_c = torch.randint(len(priors), (settings.batch,), generator=g)
                x0 = torch.cat([instances[pick_i], priors[pick_c]])
                xt, t, eps = noisy(x0, alphas, g, settings.grid)
                pred = pipe.unet(xt, t, encoder_hidden_states=encode_prompts(pipe, prompts)).sample
                weights = loss_weights(alphas, t, settings.x0_weight)
                err = (pred - eps).pow(2).flatten(1).mean(1) * weights
                b = settings.batch
                loss = err[:b].mean() + settings.prior_weight * err[b:].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {
        ref: ModuleDelta(
            f.up.detach().clone(),
            f.down.detach().clone(),
            (1, 1) if is_conv(modules[ref]) else None,
        )
        for ref, f in factors.items()
    }


def write_concept_lora(
    path: Path, deltas: Mapping[ModuleRef, ModuleDelta], concept: ToyConcept, settings: LoraSettings
) -> Path:
    """Write ``deltas`` as a kohya LoRA with the metadata kohya's DreamBooth mode records
    (dataset folders ``"<repeats>_<trigger> <class>"`` and ``"1_<class>"``) and, like a
    kohya file, no trigger phrase and no sidecar: readers find the trigger in the folders."""
    from loraclr_ext.files.metadata import LoraMetadata
    from loraclr_ext.files.write import write_lora

    folder = f"{settings.repeats}_{concept.prompt}"
    reg = f"1_{concept.noun}"
    extra = {
        "ss_dataset_dirs": json.dumps(
            {folder: {"n_repeats": settings.repeats, "img_count": settings.instances}}
        ),
        "ss_reg_dataset_dirs": json.dumps(
            {reg: {"n_repeats": 1, "img_count": settings.class_images}}
        ),
        "ss_num_train_images": str(settings.instances * settings.repeats),
        "ss_num_reg_images": str(settings.class_images),
        "ss_max_train_steps": str(settings.steps),
        "ss_learning_rate": str(settings.lr),
        "ss_prior_loss_weight": str(settings.prior_weight),
        "ss_seed": str(settings.seed),
    }
    return write_lora(
        path,
        deltas,
        Architecture.SD1,
        LoraMetadata(
            title=concept.prompt,
            tag_frequency=[{folder: {concept.prompt: settings.instances}}],
            description=f"toy-world DreamBooth LoRA of '{concept.prompt}'",
            extra=extra,
        ),
        dtype=torch.float32,
        overwrite=True,
        sidecar=False,
        check_shapes=False,
    )
