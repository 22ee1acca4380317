"""Which images the preview grid holds: one per concept, then the joint prompt twice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraclr_ext.pipeline.options import ConceptSpec

AUTO_PREVIEW_STEPS = {"cuda": 20, "mps": 20, "cpu": 10}
"""Sampler steps of a preview image per device type: the WebUI's own default on a GPU,
half of it on a CPU, where one SD 1.5 image at 256 px costs ~10 s per step on 2 cores."""
PREVIEW_CFG = 7.0
"""Classifier-free guidance scale of the preview images (the WebUI's txt2img default)."""
JOINT_PREVIEW = "{} in a park"
"""The joint prompt, the concepts joined as in ``"A and B"`` (report template 1's scene)."""


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file applied at ``strength`` in one preview image."""

    path: Path
    strength: float

    @property
    def name(self) -> str:
        """The name a WebUI prompt uses for it: ``<lora:NAME:strength>`` (the file stem)."""
        return self.path.stem

    def tag(self) -> str:
        return f"<lora:{self.name}:{self.strength:g}>"


@dataclass(frozen=True)
class PreviewCell:
    """One image of the grid: a prompt (without LoRA tags) and the LoRAs applied to it."""

    label: str
    prompt: str
    loras: tuple[LoraUse, ...]

    def prompt_with_tags(self) -> str:
        """The prompt as a WebUI user would type it, LoRA tags last."""
        return " ".join([self.prompt, *(use.tag() for use in self.loras)])


def joint_prompt(prompts: Sequence[str]) -> str:
    """Every concept's prompt in one scene: ``"A and B in a park"``, ``"A, B and C in a park"``."""
    names = list(prompts)
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return JOINT_PREVIEW.format(joined)


def preview_cells(concepts: Sequence[ConceptSpec], merged: Path) -> list[PreviewCell]:
    """The grid's cells, in order: each concept's prompt with the merged LoRA, then the
    joint prompt with the merged LoRA, then the joint prompt with the input LoRAs stacked
    at their strengths (what the merge replaces)."""
    with_merged = (LoraUse(merged, 1.0),)
    cells = [PreviewCell(f"{c.prompt} | merged", c.prompt, with_merged) for c in concepts]
    joint = joint_prompt([c.prompt for c in concepts])
    stacked = tuple(LoraUse(Path(c.path), c.strength) for c in concepts)
    cells.append(PreviewCell("together | merged", joint, with_merged))
    cells.append(PreviewCell("together | stacked", joint, stacked))
    return cells


def preview_steps(device: torch.device | str, steps: int | None = None) -> int:
    """Sampler steps for the preview on ``device``: ``steps`` if given, else the auto value."""
    if steps:
        return int(steps)
    return AUTO_PREVIEW_STEPS.get(torch.device(device).type, AUTO_PREVIEW_STEPS["cuda"])
