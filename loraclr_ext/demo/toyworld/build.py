"""Build the toy world once and keep it on disk: the base model folder and one kohya LoRA
per concept, under ``<cache>/<settings key>/`` so changed settings never reuse old files."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from loraclr_ext.demo.toyworld.dreambooth import LoraSettings, train_lora, write_concept_lora
from loraclr_ext.demo.toyworld.train import BaseSettings, save_model, train_base
from loraclr_ext.demo.toyworld.world import CONCEPTS, build_world

DEFAULT_CACHE = Path("loraclr-toyworld")
STAMP = "toyworld.json"


@dataclass(frozen=True)
class ToyWorldSettings:
    """Everything that decides the built files (their hash names the cache folder)."""

    base: BaseSettings = field(default_factory=BaseSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def keys(self) -> tuple[str, str]:
        """Folder names: of the base model's settings, and of the LoRAs' (which depend on
        the base too, as they sit below its folder)."""
        return _key(asdict(self.base)), _key(asdict(self.lora))


def _key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ToyWorldFiles:
    """The built world: model folder, LoRA file per trigger, and build seconds per part."""

    model: Path
    loras: dict[str, Path]
    seconds: dict[str, float]


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` CPU threads (tiny ops: more threads only add contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_toy_world(
    cache: Path = DEFAULT_CACHE, settings: ToyWorldSettings | None = None, log: bool = False
) -> ToyWorldFiles:
    """The toy world's files, built on the CPU unless ``cache`` already holds them."""
    from loraclr_ext.hosts.standalone import StandaloneHost

    settings = settings or ToyWorldSettings()
    base_key, lora_key = settings.keys()
    model = Path(cache) / base_key / "model"
    folder = Path(cache) / base_key / lora_key
    stamp = folder / STAMP
    if stamp.is_file():
        data = json.loads(stamp.read_text())
        found = {k: folder / v for k, v in data["loras"].items()}
        return ToyWorldFiles(model, found, data["seconds"])
    folder.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    base_stamp = model.parent / STAMP
    with threads(1):
        if base_stamp.is_file():
            seconds["base"] = json.loads(base_stamp.read_text())["seconds"]
        else:
            pipe, seconds["base"] = train_base(settings.base, log=log)
            save_model(pipe, model)
            base_stamp.write_text(json.dumps({"seconds": round(seconds["base"], 1)}))
        host = StandaloneHost.load(model, "cpu")
        world = build_world(settings.base.seed)
        loras: dict[str, Path] = {}
        for i, concept in enumerate(CONCEPTS):
            started = time.perf_counter()
            lora_settings = replace(settings.lora, seed=settings.lora.seed + i)
            deltas = train_lora(host, world, concept, lora_settings)
            name = f"{concept.prompt.replace(' ', '_')}.safetensors"
            loras[concept.trigger] = write_concept_lora(
                folder / name, deltas, concept, lora_settings
            )
            seconds[concept.trigger] = round(time.perf_counter() - started, 1)
            if log:
                print(f"LoRA '{concept.prompt}': {seconds[concept.trigger]} s")
    seconds["base"] = round(seconds["base"], 1)
    data = {
        "loras": {k: p.name for k, p in loras.items()},
        "seconds": seconds,
        "settings": asdict(settings),
    }
    stamp.write_text(json.dumps(data, indent=2))
    return ToyWorldFiles(model, loras, seconds)
