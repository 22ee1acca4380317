"""Synthetic layer features shaped like a real text stage (design §7).

Every concept runs the same prompt templates, so its rows are aligned position by
position with every other concept's: BOS and template words are shared (perturbed a
little by the concept's own text-encoder LoRA), the trigger tokens are the concept's own,
and the 70 padding rows after EOS are near-copies of the EOS state, as in CLIP. Each LoRA
acts mostly on its trigger direction, as a trained concept LoRA does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKENS = 77
TRIGGER_POSITIONS = (3, 4)
EOS_POSITION = 6


@dataclass
class SynthLayer:
    """One layer's problem. Shapes: ``W0 [out, in]``, ``ups[i] [out, r]``,
    ``downs[i] [r, in]``, ``features[i] [prompts·77, in]``, ``trigger [prompts·77]`` (bool)."""

    base_weight: torch.Tensor
    ups: list[torch.Tensor]
    downs: list[torch.Tensor]
    features: list[torch.Tensor]
    trigger: torch.Tensor

    @property
    def deltas(self) -> list[torch.Tensor]:
        return [u @ d for u, d in zip(self.ups, self.downs, strict=True)]


def synth_layer(
    in_features: int,
    out_features: int,
    concepts: int,
    *,
    rank: int = 16,
    prompts: int = 4,
    seed: int = 0,
) -> SynthLayer:
    """Build an aligned multi-concept problem for one ``in → out`` layer."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    templates = randn(prompts, TOKENS, in_features)
    eos = templates[:, EOS_POSITION : EOS_POSITION + 1]
    templates[:, EOS_POSITION + 1 :] = eos + 0.1 * randn(
        prompts, TOKENS - EOS_POSITION - 1, in_features
    )
    trigger = torch.zeros(prompts, TOKENS, dtype=torch.bool)
    trigger[:, list(TRIGGER_POSITIONS)] = True
    base_weight = randn(out_features, in_features) / in_features**0.5
    ups, downs, features = [], [], []
    for _ in range(concepts):
        words = randn(len(TRIGGER_POSITIONS), in_features)
        x = templates + 0.05 * randn(prompts, TOKENS, in_features)
        x[:, list(TRIGGER_POSITIONS)] = words + 0.3 * randn(
            prompts, len(TRIGGER_POSITIONS), in_features
        )
        direction = torch.linalg.qr(words.T).Q.T  # [2, in]: the concept's trigger subspace
        down = 0.1 * randn(rank, in_features) / in_features**0.5
        down[: direction.shape[0]] += direction
        ups.append(randn(out_features, rank) / rank**0.5)
        downs.append(down)
        features.append(x.reshape(-1, in_features))
    return SynthLayer(base_weight, ups, downs, features, trigger.reshape(-1))
