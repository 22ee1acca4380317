"""Architectures the merge understands and their fixed facts."""

from __future__ import annotations

from enum import Enum


class Architecture(str, Enum):
    """Base-model family of a checkpoint or a LoRA."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.value]

    @property
    def text_components(self) -> tuple[str, ...]:
        return ("te1", "te2") if self is Architecture.SDXL else ("te1",)
