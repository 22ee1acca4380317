"""Preview images on the standalone host: the diffusers pipeline's own call and scheduler.

LoRAs are applied by forward hooks (the merge's own :func:`~loraclr_ext.pipeline.hooks.applied`)
from the files as read back from disk, so the merged image shows what the written file
gives; the pipeline's weights are never touched (checked by the host's weight guard).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from loraclr_ext.files.read import read_lora
from loraclr_ext.hosts.standalone import StandaloneHost
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.hooks import applied
from loraclr_ext.preview.cells import LoraUse, PreviewCell


class StandaloneRenderer:
    """Draws preview cells with ``host.pipe(...)``: its scheduler, CFG, VAE decode.

    Args:
        host: the host the merge ran on.
        check_shapes: as in :func:`loraclr_ext.files.read.read_lora` (off for tiny models).
    """

    def __init__(self, host: StandaloneHost, *, check_shapes: bool = True) -> None:
        self.host = host
        self.check_shapes = check_shapes
        self.sampler = type(host.pipe.scheduler).__name__
        self._read: dict[Path, dict[ModuleRef, ModuleDelta]] = {}

    def render(self, cell: PreviewCell, *, seed: int, steps: int, size: int, cfg: float) -> Any:
        """One RGB ``PIL.Image`` ``[size, size]``; noise from a CPU generator seeded ``seed``."""
        deltas = [self._deltas(use) for use in cell.loras]
        refs = {ref for d in deltas for ref in d}
        modules = self.host.modules(refs)
        pipe = self.host.pipe
        decode = getattr(pipe, "vae", None) is not None
        with torch.no_grad(), self.host.clean_weights(), ExitStack() as stack:
            for delta in deltas:
                stack.enter_context(applied(modules, delta))
            out = pipe(
                prompt=cell.prompt,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=cfg,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil" if decode else "latent",
            )
        image = out.images[0]
        return image if decode else latent_image(image, size)

    def _deltas(self, use: LoraUse) -> dict[ModuleRef, ModuleDelta]:
        if use.path not in self._read:
            lora = read_lora(
                use.path,
                self.host.architecture,
                check_shapes=self.check_shapes,
                base_weight=self.host.base_weight,
            )
            self._read[use.path] = lora.deltas
        return {ref: d.scaled(use.strength) for ref, d in self._read[use.path].items()}


def latent_image(latents: torch.Tensor, size: int) -> Any:
    """A pipeline without a VAE: latent channels 0–2 ``[3, h, w]`` stretched to 0–255 and
    scaled up to ``size`` px (nearest), so the grid still shows where things differ."""
    from PIL import Image

    x = latents[:3].float().cpu()
    x = (x - x.amin()) / (x.amax() - x.amin()).clamp_min(1e-8)
    pixels = (x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
