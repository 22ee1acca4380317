"""The one typed options object shared by the command line, the WebUI tab and the REST API.

Every field carries its help text and bounds as metadata, so the CLI flags, the UI widgets
and the API schema can all be derived from this class and cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.solver import SolverSettings

Precision = Literal["fp16", "bf16", "fp32"]
MIN_SIZE = 64
AUTO_RECORDING = {"cuda": (12, 512), "mps": (12, 512), "cpu": (4, 256)}
"""``(steps, size)`` of the recording run when left on auto, per device type. On a CPU the
recording run is most of a merge's time; 4 steps at 256 px (1/12 of the UNet work
of 12 at 512) keep a two-LoRA SD 1.5 merge to minutes (bench/README.md). Apple MPS keeps
the GPU values (not measured here); unknown accelerators get them too."""
Subspace = Literal["lora", "full"]
TEMPLATES = (
    "{}",
    "a photo of {}",
    "a portrait of {}",
    "{} in a garden",
    "a close-up of {}, detailed",
)
"""Fit templates: every concept runs all of them, so features align position by position."""
HELD_OUT_TEMPLATES = ("a painting of {}", "{} standing on a city street at night")
"""Report templates: never used for fitting."""
JOINT_TEMPLATES = ("{} and {} in a park", "{} next to {}")
"""Report templates naming two concepts together (held out: never used for fitting)."""
NEUTRAL_PROMPTS = ("a photo of a landscape", "a bowl of fruit on a table", "a city street at night")
"""Prompts without any concept, for base preservation."""


def auto_recording(device: torch.device | str) -> tuple[int, int]:
    """``(steps, size)`` of the recording run chosen for ``device`` (see ``AUTO_RECORDING``)."""
    kind = torch.device(device).type
    return AUTO_RECORDING.get(kind, AUTO_RECORDING["cuda"])


def _opt(default: Any, help: str, **bounds: Any) -> Any:
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class MergeOptions:
    """What the user chooses for one merge (concepts are passed separately)."""

    output: str = _opt("merged", "Output LoRA name (file stem in the Lora folder)")
    rank: int | None = _opt(
        None,
        "Target rank; 0 = exact, the default (≤ sum of the inputs' ranks)",
        minimum=0,
        zero="exact",
    )
    text_encoder: bool = _opt(True, "Merge text-encoder layers")
    cross_attention: bool = _opt(True, "Merge cross-attention K/V layers")
    unet_other: bool = _opt(
        True, "Merge the other UNet layers (attention, feed-forward, LoCon convs)"
    )
    steps: int | None = _opt(
        None,
        "Denoising steps recorded per concept for the UNet layers; 0 or empty = auto "
        f"({AUTO_RECORDING['cuda'][0]} on a GPU, {AUTO_RECORDING['cpu'][0]} on a CPU)",
        minimum=0,
        maximum=100,
        zero="auto",
    )
    size: int | None = _opt(
        None,
        "Image size (px) of the recording run, lower it to save memory; 0 or empty = auto "
        f"({AUTO_RECORDING['cuda'][1]} on a GPU, {AUTO_RECORDING['cpu'][1]} on a CPU)",
        minimum=0,
        maximum=2048,
        zero="auto",
    )
    seed: int = _opt(0, "Seed of the recording run and of the token samples")
    margin: float = _opt(
        0.5, "LoRACLR margin: share of each concept pair's own separation to keep", minimum=0.0
    )
    repel: float = _opt(
        1.0, "Weight μ of the contrastive repel term (0 = least squares + regulariser)", minimum=0.0
    )
    reg: float = _opt(
        1e-3,
        "Weight λ of the pull towards the stacked LoRAs (a relative ridge): where the recorded "
        "features say nothing, the merge keeps the LoRAs' own behaviour",
        minimum=0.0,
    )
    preserve: float = _opt(
        0.1, "Weight of base preservation on neutral prompts (mean squared change)", minimum=0.0
    )
    iterations: int = _opt(
        30, "L-BFGS iterations per layer when a margin is violated", minimum=0, maximum=1000
    )
    trigger_weight: float = _opt(
        8.0, "How much concept-specific (trigger) tokens count in the text fit", minimum=0.0
    )
    padding_weight: float = _opt(
        0.1, "How much padding tokens after the end of a prompt count", minimum=0.0
    )
    subspace: Subspace = _opt(
        "lora",
        "Input directions the merged down factor may read: 'lora' = the span of the inputs' "
        "down factors (generalises to unseen prompts; exact for one LoRA), 'full' = all",
    )
    memory_budget: float = _opt(
        0.0,
        "Device memory (GB) the merge may use beyond the loaded model; 0 = auto (on a GPU "
        "its free memory less a tenth of the card, on a CPU the available RAM less a tenth). "
        "When the layers' statistics do not fit, they are recorded in several passes "
        "(slower) instead of running out of memory",
        minimum=0.0,
        maximum=1024.0,
        zero="auto",
    )
    precision: Precision = _opt("fp16", "Tensor precision of the saved file")
    overwrite: bool = _opt(False, "Replace an existing file of the same name")
    quality: bool = _opt(
        True, "Measure fidelity, isolation and base preservation against baselines"
    )
    preview: bool = _opt(
        False,
        "After saving, draw n + 2 images with the WebUI's own sampler on one seed: each "
        "concept with the merged LoRA, and all concepts in one prompt merged beside stacked "
        "(costs as much as generating those images: 10 steps each on a CPU, 20 on a GPU)",
    )

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "size"):  # number fields spell "exact"/"auto" as 0
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
            if value is None or isinstance(value, bool | str):
                continue
            if low is not None and value < low:
                raise InvalidInputError(f"{f.name} must be ≥ {low}, got {value}.")
            if high is not None and value > high:
                raise InvalidInputError(f"{f.name} must be ≤ {high}, got {value}.")
        if self.precision not in ("fp16", "bf16", "fp32"):
            raise InvalidInputError(
                f"precision must be fp16, bf16 or fp32, got {self.precision!r}."
            )
        if self.subspace not in ("lora", "full"):
            raise InvalidInputError(f"subspace must be 'lora' or 'full', got {self.subspace!r}.")
        if not (self.text_encoder or self.cross_attention or self.unet_other):
            raise InvalidInputError(
                "Select at least one part to merge (text encoder, cross-attention, UNet)."
            )
        if self.size is not None and (self.size < MIN_SIZE or self.size % 8):
            raise InvalidInputError(
                f"size must be a multiple of 8 from {MIN_SIZE} (or 0 = auto), got {self.size}."
            )

    @property
    def auto(self) -> list[str]:
        """The options left for the device to decide (``steps``, ``size``)."""
        return [name for name in ("steps", "size") if getattr(self, name) is None]

    def resolved(self, device: torch.device | str) -> MergeOptions:
        """These options with ``steps`` and ``size`` left on auto chosen for ``device``."""
        steps, size = auto_recording(device)
        return replace(
            self,
            steps=steps if self.steps is None else self.steps,
            size=size if self.size is None else self.size,
        )

    @property
    def recording(self) -> tuple[int, int]:
        """``(steps, size)`` of the recording run, once :meth:`resolved` chose them.

        Raises:
            InvalidInputError: steps or size is still on auto.
        """
        if self.steps is None or self.size is None:
            raise InvalidInputError("Recording steps and size are on auto; resolve them first.")
        return self.steps, self.size

    def solver_settings(self) -> SolverSettings:
        """The per-layer solver settings these options imply."""
        return SolverSettings(
            objective="loraclr",
            margin=self.margin,
            repel=self.repel,
            reg=self.reg,
            distance="rms",
            preserve=self.preserve,
            iterations=self.iterations,
            rank=self.rank,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeOptions:
        """Build from a JSON-like mapping; unknown keys are an error, not ignored."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidInputError(f"Unknown option(s): {', '.join(unknown)}.")
        return cls(**data)


@dataclass(frozen=True)
class ConceptSpec:
    """One LoRA to merge: its file, its concept prompt and its strength."""

    path: Path
    prompt: str
    strength: float = 1.0
