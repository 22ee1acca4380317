"""``modules.processing``: txt2img as far as the preview grid uses it (dossier §2.5).

``process_images`` behaves like A1111 1.10's in what a caller can see: it writes the last
prompt to ``<data_path>/params.txt`` (unless ``--no-prompt-history``), stops before its batch
when ``state.interrupted``, drives ``sampling_step``/``sampling_steps`` and calls
``state.nextjob()``, looks the ``<lora:NAME:w>`` tags up in the Lora extension's
``available_networks`` (an unknown name is only logged, as A1111 does) and returns a
``Processed`` with PIL images. The image comes from the fake model's own ``generate`` of
the prompt without tags, tinted by the bytes of each LoRA file found, so different LoRA
sets give different images and the same call gives the same bytes. Like reForge's (main,
``modules/processing.py``: ``p.scripts.alwayson_scripts`` read unchecked), it fails on a
``p.scripts`` of ``None``, which A1111 and Forge would accept.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import networks
import numpy as np

from modules import paths, shared

calls: list[dict[str, Any]] = []
"""Every ``process_images`` call: prompt, seed, steps, size, sampler, cfg, LoRAs found."""
not_found: list[str] = []
TAG = re.compile(r"<lora:([^:>]+):([^>]+)>")


@dataclass
class StableDiffusionProcessingTxt2Img:
    sd_model: Any = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    override_settings: dict = field(default_factory=dict)
    scripts: Any = None
    script_args: list = field(default_factory=list)
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class Processed:
    images: list
    index_of_first_image: int = 0


def process_images(p: StableDiffusionProcessingTxt2Img) -> Processed:
    if not getattr(shared.cmd_opts, "no_prompt_history", False) and paths.data_path:
        with open(os.path.join(paths.data_path, "params.txt"), "w", encoding="utf8") as f:
            f.write(f"{p.prompt}\nSteps: {p.steps}, Seed: {p.seed}")
    state = shared.state
    found = []
    for name, weight in TAG.findall(p.prompt):
        path = networks.available_networks.get(name)
        if path is None:
            not_found.append(name)
        else:
            found.append((name, float(weight), path))
    calls.append(
        {
            **{k: getattr(p, k) for k in ("prompt", "seed", "steps", "sampler_name", "cfg_scale")},
            "size": (p.width, p.height),
            "saves": not (p.do_not_save_samples and p.do_not_save_grid),
            "loras": [(n, w) for n, w, _ in found],
            "always_on": len(p.scripts.alwayson_scripts),  # reForge: AttributeError on None
        }
    )
    if state.interrupted:
        return Processed(images=[])
    state.sampling_steps = p.steps
    for step in range(p.steps):
        state.sampling_step = step
    state.nextjob()
    plain = TAG.sub("", p.prompt).strip()
    latents = p.sd_model.generate(plain, seed=p.seed, steps=2, size=p.width)
    return Processed(images=[_image(latents, found, p.width)])


def _image(latents: bytes, found: list, size: int):
    from PIL import Image

    values = np.frombuffer(latents, dtype=np.float32)
    side = round((values.size // 4) ** 0.5)
    x = values.reshape(4, side, side)[:3]
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
    for _name, weight, path in found:
        with open(path, "rb") as f:
            tint = hashlib.sha256(f.read()).digest()
        x = (x + weight * np.frombuffer(tint[:3], dtype=np.uint8)[:, None, None] / 255) % 1.0
    pixels = (np.moveaxis(x, 0, 2) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)


def reset() -> None:
    calls.clear()
    not_found.clear()


__all__ = [
    "Processed",
    "StableDiffusionProcessingTxt2Img",
    "process_images",
    "reset",
]
