"""Preview images in the WebUI: its own txt2img (``processing.process_images``), sampler,
extra-network tags and VAE, exactly as a user's generation with ``<lora:NAME:w>`` runs.

The WebUI's modules are handed in by the caller (``ui/``), so this module imports none.
What a generation would change beyond the image is put back: A1111 and Forge write the
last prompt to ``params.txt`` (the "read generation parameters" button reads it); images
and grids are not saved; settings are not overridden. The LoRAs a preview applied stay in
the live weights until the next generation, as after any generation with them (the WebUI's
Lora extension swaps them out then, and a merge runs on clean weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraclr_ext.errors import LoraClrError
from loraclr_ext.preview.cells import PreviewCell

SAMPLER = "DPM++ 2M"
"""A1111 1.10's txt2img default sampler; Forge and reForge have it under the same name."""


class WebuiRenderer:
    """Draws preview cells with the running WebUI's txt2img.

    Every generation rewrites the WebUI's last-prompt file; draw the whole grid inside
    :func:`kept` for it.

    Args:
        processing: the WebUI's ``modules.processing``.
        sd_model: the loaded model (``shared.sd_model``).
        scripts: the WebUI's ``modules.scripts``: each image gets an empty
            ``ScriptRunner``, so no always-on script (ControlNet, ADetailer) runs on a
            preview, and reForge, which reads ``p.scripts.alwayson_scripts`` without
            checking for ``None`` (``modules/processing.py``), draws it.
        sampler: the sampler's name in the WebUI.
    """

    def __init__(
        self, processing: Any, sd_model: Any, scripts: Any, sampler: str = SAMPLER
    ) -> None:
        self.processing = processing
        self.sd_model = sd_model
        self.scripts = scripts
        self.sampler = sampler

    def render(self, cell: PreviewCell, *, seed: int, steps: int, size: int, cfg: float) -> Any:
        """One image of ``cell``'s prompt with its ``<lora:…>`` tags.

        Raises:
            LoraClrError: the WebUI returned no image (stopped inside its sampler).
        """
        p = self.processing.StableDiffusionProcessingTxt2Img(
            sd_model=self.sd_model,
            prompt=cell.prompt_with_tags(),
            negative_prompt="",
            seed=seed,
            sampler_name=self.sampler,
            batch_size=1,
            n_iter=1,
            steps=steps,
            cfg_scale=cfg,
            width=size,
            height=size,
            do_not_save_samples=True,
            do_not_save_grid=True,
        )
        p.scripts = self.scripts.ScriptRunner()
        p.script_args = []
        try:
            processed = self.processing.process_images(p)
        finally:
            close = getattr(p, "close", None)
            if callable(close):
                close()
        images = list(getattr(processed, "images", None) or [])
        if not images:
            raise LoraClrError(f"The WebUI returned no image for {cell.label!r}.")
        return images[getattr(processed, "index_of_first_image", 0)].convert("RGB")


@contextmanager
def kept(paths: Sequence[Path]) -> Iterator[None]:
    """Leave every file of ``paths`` as it was: its bytes put back, or the file removed if
    it was absent (read once before and once after, however many images ran inside)."""
    before = {path: path.read_bytes() if path.is_file() else None for path in paths}
    try:
        yield
    finally:
        for path, data in before.items():
            if data is None:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.read_bytes() != data:
                path.write_bytes(data)
