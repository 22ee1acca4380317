"""Run the preview cells through a host's renderer and lay the images out in one grid.

Images are ``PIL.Image`` objects: every host that can draw one (the WebUIs, diffusers)
ships Pillow, so it is imported only here, when a grid is made.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from loraclr_ext.errors import MergeInterruptedError
from loraclr_ext.pipeline.progress import Progress
from loraclr_ext.preview.cells import PreviewCell

LABEL_HEIGHT = 14
"""Pixels of the caption strip under each image (Pillow's default bitmap font is 11 px)."""
PREVIEW_STOPPED = "Preview stopped by Interrupt; the merged LoRA was saved."


class Renderer(Protocol):
    """Draws one preview image on the loaded checkpoint with the host's own sampler."""

    sampler: str
    """The sampler's name as the host calls it (shown under the grid)."""

    def render(self, cell: PreviewCell, *, seed: int, steps: int, size: int, cfg: float) -> Any:
        """One ``size``×``size`` RGB ``PIL.Image`` of ``cell``'s prompt with its LoRAs.

        Must leave the host as it found it (weights, settings, files)."""
        ...


@dataclass
class PreviewGrid:
    """The preview after a merge.

    Attributes:
        image: the grid, one row: ``len(cells)`` images of ``size`` px side by side, each
            with its number and label underneath (``PIL.Image``, RGB).
        cells: what each image shows, left to right.
        seconds: wall time of drawing every image.
    """

    image: Any
    cells: list[PreviewCell]
    steps: int
    size: int
    seed: int
    cfg: float
    sampler: str
    seconds: float
    images: list[Any] = field(default_factory=list, repr=False)

    def png(self) -> bytes:
        """The grid as PNG bytes."""
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()

    def summary(self) -> str:
        """What was drawn and what it cost, in one line."""
        return (
            f"{len(self.cells)} images, {self.sampler}, {self.steps} steps at {self.size} px, "
            f"CFG {self.cfg:g}, seed {self.seed}: {self.seconds:.1f} s"
        )


def render_grid(
    cells: Sequence[PreviewCell],
    renderer: Renderer,
    progress: Progress,
    *,
    seed: int,
    steps: int,
    size: int,
    cfg: float,
) -> PreviewGrid:
    """Draw every cell (same seed for all) and lay them out.

    Raises:
        MergeInterruptedError: the user pressed Interrupt (checked before each image and
            after the last); no grid is made.
    """
    start = time.perf_counter()
    progress.stage("Preview images", len(cells))
    images = []
    for cell in cells:
        _check(progress)
        images.append(renderer.render(cell, seed=seed, steps=steps, size=size, cfg=cfg))
        progress.advance()
    _check(progress)
    return PreviewGrid(
        # Numbered like the caption's list: under a small image the label is cut short.
        image=compose(images, [f"{i} {c.label}" for i, c in enumerate(cells, 1)]),
        cells=list(cells),
        steps=steps,
        size=size,
        seed=seed,
        cfg=cfg,
        sampler=renderer.sampler,
        seconds=round(time.perf_counter() - start, 3),
        images=images,
    )


def _check(progress: Progress) -> None:
    if progress.interrupted():
        raise MergeInterruptedError(PREVIEW_STOPPED)


def compose(images: Sequence[Any], labels: Sequence[str]) -> Any:
    """Images side by side, each over a white strip with its label (cut to fit).

    Args:
        images: RGB ``PIL.Image`` objects of one size ``[w, h]``.
        labels: one per image.

    Returns:
        ``PIL.Image`` ``[len(images)·w, h + LABEL_HEIGHT]``.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("No preview images to lay out.")
    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        left = index * width
        grid.paste(image.convert("RGB").resize((width, height)), (left, 0))
        draw.text((left + 2, height + 1), _fit(draw, label, width - 4), fill="black")
    return grid


def _fit(draw: Any, text: str, width: int) -> str:
    """``text`` cut to at most ``width`` pixels, ending in "..." (ASCII: Pillow's bitmap
    default font has Latin-1 only)."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
