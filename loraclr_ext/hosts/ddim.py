"""The short recording run the WebUI hosts share: deterministic DDIM without guidance.

The hosts differ only in how one UNet call is made; the schedule, the noise and the update
are the same everywhere, so a merge records the same trajectory on every WebUI.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.hosts.base import StepCallback, seeded_noise

ModelOutput = Callable[[torch.Tensor, int], torch.Tensor]
"""``predict(x [B, 4, h, w] fp32, t)`` -> the model's ε or v for DDPM timestep ``t``."""


def ddim_sample(
    predict: ModelOutput,
    alphas_cumprod: torch.Tensor,
    batch: int,
    *,
    steps: int,
    size: int,
    seed: int,
    v_prediction: bool,
    callback: StepCallback | None = None,
    noise_period: int | None = None,
) -> torch.Tensor:
    """DDIM (η = 0) over ``steps`` evenly spaced timesteps from the last to 0.

    Args:
        predict: one UNet evaluation (any device; the result is brought to the CPU).
        alphas_cumprod: ``ᾱ_t`` ``[T]`` (T = 1000), on any device.
        batch: number of latents (one per conditioning row).
        size: image side in pixels (latents are ``size / 8``).
        seed: CPU generator seed, so every device starts from the same noise.
        noise_period: latents repeat their noise every this many (:func:`seeded_noise`).
        v_prediction: the model predicts v rather than ε.

    Returns:
        The final latents ``[batch, 4, size/8, size/8]``, fp32 on the CPU.
    """
    if steps < 1 or size < 8 or size % 8:
        raise InvalidInputError(f"Bad sampling settings: steps={steps}, size={size}.")
    alphas = alphas_cumprod.detach().to("cpu", torch.float64)
    timesteps = torch.linspace(alphas.shape[0] - 1, 0, steps).round().long().tolist()
    x = seeded_noise(batch, 4, size // 8, seed, noise_period).double()
    for i, t in enumerate(timesteps):
        a = float(alphas[t])
        a_prev = float(alphas[timesteps[i + 1]]) if i + 1 < steps else 1.0
        out = predict(x.float(), t).detach().cpu().double()  # no fp64 on MPS
        eps = a**0.5 * out + (1 - a) ** 0.5 * x if v_prediction else out
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        if callback is not None:
            callback(i, steps)
    return x.float()
