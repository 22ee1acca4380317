"""Canonical names of the modules a LoRA can target.

A module is named by the component it lives in and its path in the *diffusers* /
*transformers 4* layout, independent of how a file or a host spells it:

* ``unet``: diffusers ``UNet2DConditionModel`` path, e.g.
  ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``;
* ``te1``: the first (or only) CLIP text encoder, transformers-4 path with the
  ``text_model.`` level, e.g. ``text_model.encoder.layers.0.self_attn.q_proj``;
* ``te2``: SDXL's second text encoder (OpenCLIP-G in HF layout), same path style.

File readers map file keys to these names, the writer maps them back to kohya keys,
and each host maps them to its own live modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Component = Literal["unet", "te1", "te2"]
COMPONENTS: tuple[Component, ...] = ("unet", "te1", "te2")


@dataclass(frozen=True, order=True)
class ModuleRef:
    """One target module: ``component`` and its diffusers/transformers-4 dotted ``path``."""

    component: Component
    path: str

    def __str__(self) -> str:
        return f"{self.component}:{self.path}"

    @property
    def is_text(self) -> bool:
        return self.component != "unet"
