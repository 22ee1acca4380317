"""Arithmetic of the Forge family's sigma-space ``apply_model``: the DDPM schedule from the
model's sigmas, the k-diffusion input scaling, ε or v from the denoised latents it returns,
and the SDXL ADM vector (pooled text and size embeddings) its UNet takes as ``y``."""

from __future__ import annotations

import math

import torch

SDXL_POOLED = 1280
SDXL_MICRO_CONDITIONS = 6
"""SDXL's ADM vector: pooled text embedding, then original size (h, w), crop (top, left)
and target size (h, w), each number as a sinusoidal embedding."""


def sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    """ldm's ``timestep_embedding`` (cos half, then sin half) of each value: ``[n, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def alphas_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The fp64 CPU ``ᾱ_t = 1 / (1 + σ_t²)`` of discrete sigmas ``[1000]``."""
    return 1.0 / (1.0 + sigmas.to("cpu", torch.float64) ** 2)


def k_diffusion_input(x_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """DDPM-scaled latents ``x_t`` as ``apply_model`` takes them: ``x_t / √ᾱ``, fp32 CPU."""
    return x_t.cpu().double() / math.sqrt(alpha)  # fp64 on the CPU: MPS has none.float()


def network_output(
    x: torch.Tensor, denoised: torch.Tensor, sigma: float, v_prediction: bool
) -> torch.Tensor:
    """The network's own output from ``apply_model``'s input ``x`` and its denoised result
    (both fp64 CPU): ε = (x − x0) / σ, or for v-prediction
    v = (x / (σ² + 1) − x0) · √(σ² + 1) / σ; fp32."""
    if v_prediction:
        return ((x / (sigma**2 + 1) - denoised) * math.sqrt(sigma**2 + 1) / sigma).float()
    return ((x - denoised) / sigma).float()


def sdxl_adm(pooled: torch.Tensor, adm_in: int, size: int) -> torch.Tensor:
    """SDXL ``y`` ``[B, adm_in]``: ``pooled`` text ``[B, p]``, then original = target size
    ``size`` and crop (0, 0), each as a sinusoidal embedding (as SDXL's conditioner builds
    it)."""
    pooled = pooled.float().cpu()
    dim = (adm_in - pooled.shape[1]) // SDXL_MICRO_CONDITIONS
    sizes = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)
    micro = sinusoid(sizes, dim).reshape(1, -1).expand(pooled.shape[0], -1)
    return torch.cat([pooled, micro], dim=1)
