"""Train the toy world's base model: a tiny SD1-layout text-to-image UNet, ε-prediction on
DDPM noise, conditioned by a frozen seeded CLIP text encoder, written as a diffusers folder.

The folder has the layout of a released SD 1.x model (``model_index.json``, ``unet/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``vae/``), so the standalone host loads it
like any other; the VAE is the untrained tiny one of :mod:`loraclr_ext.demo.tiny` (the world
lives in latent space and is never decoded).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraclr_ext.demo.tiny import (
    _scheduler,
    _text_config,
    _tiny_vae,
    build_tiny_tokenizer,
    write_vocab_files,
)
from loraclr_ext.demo.toyworld.world import build_world, random_scene, render_scene


@dataclass(frozen=True)
class BaseSettings:
    """Size and training of the base model.

    ``text_width`` is the text encoder's width (= cross-attention context width);
    ``channels`` the UNet's two block widths. ``steps`` × ``batch`` scenes are drawn fresh
    from the world (nothing repeats), ``lr`` is AdamW's peak learning rate (cosine decay).
    ``grid``: timesteps are drawn near the ``grid`` steps of the evaluation's DDIM sampler
    (±``JITTER``; 0 = uniform over all 1000), so minutes of CPU training suffice.
    ``x0_weight``: the clamp of the loss weights (:func:`loss_weights`).
    ``train_text``: also train the text encoder (else it keeps its seeded random weights).
    ``word_scale``: the random token embeddings are drawn this many times larger than
    CLIP's initialisation (whose position embeddings are as large as its token embeddings),
    so an untrained encoder's output says which words a prompt holds more than where.
    """

    seed: int = 0
    text_width: int = 64
    channels: tuple[int, int] = (32, 64)
    steps: int = 500
    batch: int = 16
    lr: float = 2e-3
    grid: int = 10
    x0_weight: float = 100.0
    train_text: bool = False
    word_scale: float = 8.0


def unet_config(settings: BaseSettings) -> dict[str, Any]:
    """SD1's UNet layout (cross-attention down block, plain down block, mirrored up blocks,
    two layers per block, 1×1 conv ``proj_in``/``proj_out``) at toy widths."""
    return {
        "sample_size": 8,
        "block_out_channels": settings.channels,
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": settings.text_width,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        "use_linear_projection": False,
    }


def build_untrained(settings: BaseSettings) -> Any:
    """A seeded ``StableDiffusionPipeline`` with random weights (eval mode, CPU, fp32)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    try:
        text = CLIPTextModel(_text_config(settings.text_width, 2, 4, 32, "quick_gelu"))
        with torch.no_grad():
            text.get_input_embeddings().weight.mul_(settings.word_scale)
        pipe = StableDiffusionPipeline(
            vae=_tiny_vae(),
            text_encoder=text,
            tokenizer=build_tiny_tokenizer(),
            unet=UNet2DConditionModel(**unet_config(settings)),
            scheduler=_scheduler("epsilon"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    finally:
        torch.random.set_rng_state(state)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.eval()
    return pipe


def encode_prompts(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """The SD1 conditioning ``[B, 77, text_width]``: last hidden state over 77 padded tokens,
    as ``StableDiffusionPipeline.encode_prompt`` computes it."""
    tok = pipe.tokenizer
    ids = tok(
        prompts,
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pipe.text_encoder(ids)[0]


JITTER = 20
"""Half-width (timesteps) of the band around each grid step that training draws from."""


def draw_timesteps(count: int, total: int, grid: int, g: torch.Generator) -> torch.Tensor:
    """``[count]`` training timesteps: uniform, or near ``grid`` evenly spaced steps from
    ``total − 1`` to 0 (the timesteps ``hosts.ddim.ddim_sample`` visits)."""
    if grid <= 0:
        return torch.randint(0, total, (count,), generator=g)
    points = torch.linspace(total - 1, 0, grid).round().long()
    jitter = torch.randint(-JITTER, JITTER + 1, (count,), generator=g)
    return (points[torch.randint(grid, (count,), generator=g)] + jitter).clamp(0, total - 1)


def loss_weights(alphas: torch.Tensor, t: torch.Tensor, clamp: float) -> torch.Tensor:
    """Weights ``[B]`` of the ε loss: ``1/SNR`` clamped to ``[1, clamp]`` (``clamp ≤ 1``:
    all 1). Weighted by ``1/SNR`` the ε loss is the error of the implied ``x0``; at high
    noise, where a prompt decides what is drawn, plain ε loss scales that error by SNR
    (``ᾱ/(1−ᾱ)`` ≈ 0.005 at t = 999) and the text is learned far too slowly for minutes
    of CPU training."""
    if clamp <= 1:
        return torch.ones(t.shape)
    inverse_snr = (1 - alphas[t]) / alphas[t]
    return inverse_snr.clamp(1.0, clamp)


def noisy(
    x0: torch.Tensor, alphas: torch.Tensor, g: torch.Generator, grid: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDPM forward process: ``(x_t, t [B], ε)`` (timesteps by :func:`draw_timesteps`)."""
    t = draw_timesteps(x0.shape[0], alphas.shape[0], grid, g)
    eps = torch.randn(x0.shape, generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def warmup_cosine(step: int, total: int, warmup: int = 10) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to 5 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_base(settings: BaseSettings = BaseSettings(), log: bool = False) -> tuple[Any, float]:
    """Train the UNet on fresh world scenes; returns the pipeline and the seconds taken."""
    started = time.perf_counter()
    pipe = build_untrained(settings)
    if settings.train_text:
        pipe.text_encoder.train()
    world = build_world(settings.seed)
    g = torch.Generator().manual_seed(settings.seed + 1)
    alphas = pipe.scheduler.alphas_cumprod.float()
    unet = pipe.unet
    unet.train()
    params = list(unet.parameters())
    if settings.train_text:
        params += list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, settings.steps))
    running = 0.0
    for step in range(settings.steps):
        scenes = [random_scene(g) for _ in range(settings.batch)]
        x0 = torch.stack([render_scene(world, objects, g) for _, objects in scenes])
        with torch.set_grad_enabled(settings.train_text):
            context = encode_prompts(pipe, [prompt for prompt, _ in scenes])
        xt, t, eps = noisy(x0, alphas, g, settings.grid)
        err = (unet(xt, t, encoder_hidden_states=context).sample - eps).pow(2).flatten(1)
        loss = (err.mean(1) * loss_weights(alphas, t, settings.x0_weight)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = 0.9 * running + 0.1 * float(loss.detach()) if step else float(loss.detach())
        if log and step % 50 == 0:
            print(f"base step {step}: loss {running:.4f} ({time.perf_counter() - started:.0f} s)")
    unet.eval()
    pipe.text_encoder.eval()
    return pipe, time.perf_counter() - started


def save_model(pipe: Any, folder: Path) -> Path:
    """Write ``pipe`` as a diffusers folder with safetensors weights and the classic
    tokenizer files; returns the folder."""
    pipe.save_pretrained(folder, safe_serialization=True)
    write_vocab_files(folder / "tokenizer")
    return folder
