"""The protocol every host adapter implements.

The merge engine drives a host only through this surface: it asks for live modules by
canonical name, encodes prompts, runs a short seeded denoising loop and predicts noise.
Hosts never see deltas or solvers; the engine attaches forward hooks to the modules a
host returns, so host weights are never written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.targets import ModuleRef


@dataclass
class Conditioning:
    """Output of the text stage for a batch of prompts.

    Attributes:
        context: cross-attention input ``[B, T, ctx]`` (T = 77 for CLIP; SDXL concatenates
            both encoders' hidden states, ctx = 2048).
        pooled: SDXL pooled text embedding ``[B, 1280]``; ``None`` for SD1/SD2.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> Conditioning:
        """The conditioning of prompts ``start`` to ``stop - 1`` (views, no copy)."""
        pooled = None if self.pooled is None else self.pooled[start:stop]
        return Conditioning(self.context[start:stop], pooled)

    @staticmethod
    def concat(parts: list[Conditioning]) -> Conditioning:
        """The conditionings of ``parts`` in one batch, in order (all SDXL or none)."""
        pooled = [p.pooled for p in parts if p.pooled is not None]
        return Conditioning(
            torch.cat([p.context for p in parts]),
            torch.cat(pooled) if len(pooled) == len(parts) else None,
        )


@dataclass
class Tokens:
    """Tokenisation of a batch of prompts, as the host's text stage sees them.

    Attributes:
        ids: per prompt, the token ids *including* BOS and EOS, without padding.
        length: the padded sequence length T the encoders run at (77 for CLIP).
    """

    ids: list[list[int]]
    length: int


StepCallback = Callable[[int, int], None]
"""Called as ``callback(step_index, total_steps)`` after every denoising step."""


@runtime_checkable
class Host(Protocol):
    """A loaded base model the merge can run concepts through."""

    architecture: Architecture
    device: torch.device
    dtype: torch.dtype
    max_batch: int | None
    """At most this many latents per UNet call (``None``: the whole batch at once). The
    engine lowers it after running out of memory; results do not depend on it."""

    def modules(self, refs: Iterable[ModuleRef]) -> dict[ModuleRef, torch.nn.Module]:
        """Live modules for ``refs``; refs the model lacks are left out of the result."""
        ...

    def base_weight(self, ref: ModuleRef) -> torch.Tensor:
        """A CPU fp32 copy of the module's weight flattened to ``[out, in·kh·kw]``."""
        ...

    def tokenize(self, prompts: list[str]) -> Tokens:
        """Token ids of ``prompts`` (first text encoder's tokenizer)."""
        ...

    def encode(self, prompts: list[str]) -> Conditioning:
        """Run the text encoder(s) on ``prompts``; forward hooks on text modules fire here."""
        ...

    def sample(
        self,
        cond: Conditioning,
        *,
        steps: int,
        size: int,
        seed: int,
        callback: StepCallback | None = None,
        noise_period: int | None = None,
    ) -> torch.Tensor:
        """A short seeded denoising run without CFG; returns the final latents
        ``[B, 4, size/8, size/8]``. UNet forward hooks fire at every step. The starting
        noise is :func:`seeded_noise` (``noise_period``: see there)."""
        ...

    def predict_noise(
        self, latents: torch.Tensor, timestep: int, cond: Conditioning
    ) -> torch.Tensor:
        """One UNet evaluation: model output (ε or v) for ``latents`` ``[B, 4, h, w]``."""
        ...

    def clean_weights(self) -> AbstractContextManager[None]:
        """Context in which the model runs with no host-applied LoRA merged in, and after
        which every weight is exactly as before (also on error)."""
        ...


UnetCall = Callable[[torch.Tensor, Conditioning], torch.Tensor]
"""One UNet evaluation: ``call(latents [b, 4, h, w], cond of b prompts)`` -> ``[b, 4, h, w]``."""


def in_batches(
    call: UnetCall, latents: torch.Tensor, cond: Conditioning, max_batch: int | None
) -> torch.Tensor:
    """``call`` on at most ``max_batch`` latents (with their prompts' conditioning) at a
    time, outputs concatenated in order: the UNet treats every latent on its own, so the
    result is the whole batch's, with the activation memory of ``max_batch`` latents."""
    batch = int(latents.shape[0])
    if not max_batch or batch <= max_batch:
        return call(latents, cond)
    outs = [
        call(latents[start : start + max_batch], cond.rows(start, start + max_batch))
        for start in range(0, batch, max_batch)
    ]
    return torch.cat(outs)


def seeded_noise(
    batch: int, channels: int, side: int, seed: int, period: int | None = None
) -> torch.Tensor:
    """Starting noise ``[batch, channels, side, side]`` (fp32, CPU) from a CPU generator
    seeded with ``seed``, so every device starts alike.

    ``period``: latent ``b`` gets the noise of latent ``b mod period``, so blocks of
    ``period`` latents run side by side in one batch start exactly as each would alone
    (``None``: every latent its own noise).

    Raises:
        ValueError: ``batch`` is not a multiple of ``period``.
    """
    period = period or batch
    if batch % period:
        raise ValueError(f"a batch of {batch} latents is not made of blocks of {period}")
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((period, channels, side, side), generator=gen)
    return noise.repeat(batch // period, 1, 1, 1)


def iter_chunks(items: list[str], size: int) -> Iterator[list[str]]:
    """Split ``items`` into consecutive chunks of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
