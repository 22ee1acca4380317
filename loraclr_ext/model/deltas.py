"""In-memory form of a LoRA: one exact low-rank delta per target module.

Every supported file format (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, full ``diff``,
diffusers/PEFT) is read into this one form, so nothing downstream knows about formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.targets import ModuleRef


@dataclass
class ModuleDelta:
    """A module's weight change ``ΔW = up @ down`` (scale already folded into ``down``).

    Shapes:
        up:   ``[out, r]``  (fp32)
        down: ``[r, in·kh·kw]`` (fp32); for a conv the kernel is flattened channel-major,
              the same order as ``weight.reshape(out, -1)`` and ``torch.nn.functional.unfold``.
        kernel: ``(kh, kw)``; ``None`` for a Linear layer, ``(1, 1)`` for a 1×1 conv.

    Formats whose delta is not a product of two factors (LoHa, LoKr, full ``diff``) are
    factored exactly by an SVD that drops only numerically-zero singular values.
    """

    up: torch.Tensor
    down: torch.Tensor
    kernel: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Flattened input size ``in·kh·kw``."""
        return int(self.down.shape[1])

    @property
    def is_conv(self) -> bool:
        return self.kernel is not None

    def dense(self) -> torch.Tensor:
        """The full ``[out, in·kh·kw]`` delta (fp32)."""
        return self.up.float() @ self.down.float()

    def scaled(self, factor: float) -> ModuleDelta:
        """The same delta times ``factor`` (user strength)."""
        return ModuleDelta(up=self.up, down=self.down * factor, kernel=self.kernel)


@dataclass
class LoraFile:
    """A LoRA read from disk, with everything the UI and the report show about it.

    Attributes:
        path: the file.
        architecture: detected base-model family, ``None`` if undecidable.
        format: ``"lora"``, ``"locon"``, ``"loha"``, ``"lokr"``, ``"full"``, ``"peft"`` or a
            ``"+"``-joined mix.
        deltas: one exact delta per matched module, strength 1 (``alpha/rank`` applied).
        unmatched: file keys that map to no module of ``architecture`` (reported, never
            silently dropped).
        notes: one line per kind of what is not merged (side parts, …), for the user.
        metadata: the safetensors ``__metadata__`` (str → str).
        triggers: trigger words, best first, by ``loraclr_ext.files.triggers.find_triggers``
            (sidecar activation text, civitai trainedWords, ``modelspec.trigger_phrase``,
            kohya dataset folders, top ``ss_tag_frequency`` tags, ``ss_output_name``).
        sha256: hex digest of the whole file (provenance in the merge recipe).
    """

    path: Path
    architecture: Architecture | None
    format: str
    deltas: dict[ModuleRef, ModuleDelta]
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.deltas.values()), default=0)
