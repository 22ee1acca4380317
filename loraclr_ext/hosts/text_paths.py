"""Text-encoder module paths across transformers versions (with or without ``text_model.``)."""

from __future__ import annotations

import torch

TEXT_MODEL_PREFIX = "text_model."


def has_text_model_level(model: torch.nn.Module) -> bool:
    """Whether a CLIP text model keeps the ``text_model.`` level in its module names.

    transformers 4 always does; transformers 5 flattened ``CLIPTextModel`` (modules are
    ``encoder.layers.N…``) but ``CLIPTextModelWithProjection`` still has ``text_model``.
    """
    return "text_model" in dict(model.named_children())


def live_text_path(canonical: str, has_level: bool) -> str:
    """Canonical (transformers-4) text path -> the loaded model's module path."""
    if not has_level and canonical.startswith(TEXT_MODEL_PREFIX):
        return canonical[len(TEXT_MODEL_PREFIX) :]
    return canonical


def canonical_text_path(live: str, has_level: bool) -> str:
    """The loaded model's module path -> canonical (transformers-4) text path."""
    return live if has_level else TEXT_MODEL_PREFIX + live
