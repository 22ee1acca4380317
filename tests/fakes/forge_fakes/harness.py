"""Test helpers for the Forge-family host tests: a ``WebuiContext`` over each fake, the
same merge through ``StandaloneHost`` for reference, host-state snapshots, LoRA patches."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from forge_fakes.common import tiny_parts
from loraclr_ext.hosts.weights import weights_fingerprint
from loraclr_ext.model.architecture import Architecture

FAST = {"steps": 1, "size": 64, "iterations": 0, "quality": False}
ROWS = [("sks_dog", "sks dog", 1.0), ("zwx_cat", "zwx cat", 1.0)]
FORGE_MEMORY = "backend.memory_management"
REFORGE_MEMORY = "ldm_patched.modules.model_management"


@dataclass
class Setup:
    """One WebUI stand-in: the context, its Lora folder, memory manager and model."""

    ctx: Any
    dir: Path
    memory: Any
    networks: Any
    sd_models: Any

    @property
    def model(self) -> Any:
        return self.sd_models.model_data.sd_model


def make_setup(kind: str, tiny: dict, tmp_path: Path, monkeypatch: Any) -> Setup:
    """A ``WebuiContext`` on a fake Forge (``kind="forge"``, starting from
    ``FakeInitialModel``) or reForge (loaded at once) over a copy of the tiny SD1 pipeline."""
    from modules import call_queue, devices, shared
    from modules.options import Options
    from modules.shared_state import State

    from forge_fakes import new_forge, reforge
    from loraclr_ext.ui.service import WebuiContext

    lora_dir = tmp_path / "Lora"
    shutil.copytree(tiny["src"], lora_dir)
    shared.cmd_opts.lora_dir = str(lora_dir)
    shared.opts = Options()
    shared.state = State()
    networks = new_forge.FakeNetworks(str(lora_dir))
    if kind == "forge":
        memory = new_forge.MemoryManagement()
        monkeypatch.setitem(sys.modules, FORGE_MEMORY, memory)
        sd_models = new_forge.FakeSdModels(lambda: forge_engine(tiny["pipe"], memory))
    else:
        memory = reforge.ModelManagement()
        monkeypatch.setitem(sys.modules, REFORGE_MEMORY, memory)
        model = reforge.FakeReforgeModel(tiny_parts(tiny["pipe"], Architecture.SD1), memory)
        sd_models = SimpleNamespace(model_data=SimpleNamespace(sd_model=model))
    ctx = WebuiContext(shared, sd_models, devices, call_queue, networks)
    ctx.check_shapes = False  # tiny model: real SD1 sizes do not apply
    return Setup(ctx, lora_dir, memory, networks, sd_models)


def forge_engine(pipe: Any, memory: Any = None) -> Any:
    """The engine Forge's loader builds for the tiny SD1 pipeline: its own copies of the
    networks, text encoders in fp16 storage (Forge on a CPU). Call it in inference mode,
    as ``forge_model_reload`` does, to get what a fresh Forge has."""
    from forge_fakes import new_forge

    memory = memory if memory is not None else new_forge.MemoryManagement()
    parts = tiny_parts(pipe, Architecture.SD1)
    return new_forge.FakeForgeEngine(parts, memory, text_storage=torch.float16)


def fresh_forge_image(pipe: Any, prompt: str = "a photo of a house", seed: int = 0) -> bytes:
    """What a just-started Forge that never merged generates (its first generation)."""
    with torch.inference_mode():
        engine = forge_engine(pipe)
    return engine.generate(prompt, seed)


def merge(setup: Setup, output: str, rows=ROWS, **overrides: Any) -> Any:
    """The tab's merge call (``WebuiContext.merge`` under the queue lock)."""
    from loraclr_ext.ui.service import ConceptRow, parse_options

    options = parse_options(setup.ctx, {**FAST, "output": output, **overrides})
    with setup.ctx.job():
        return setup.ctx.merge([ConceptRow(*r) for r in rows], options)


def standalone_merge(setup: Setup, host: Any, out_dir: Path, rows=ROWS, **overrides: Any) -> Path:
    """The same merge through ``StandaloneHost`` (the CLI's host) on the original pipeline."""
    from loraclr_ext.engine import run_merge
    from loraclr_ext.pipeline.options import ConceptSpec
    from loraclr_ext.pipeline.plan import output_path, plan_merge
    from loraclr_ext.ui.service import parse_options

    options = parse_options(setup.ctx, {**FAST, "output": "reference", **overrides})
    specs = [ConceptSpec(setup.ctx.resolve(n), p, s) for n, p, s in rows]
    out = output_path(out_dir, "reference")
    plan = plan_merge(specs, options, host.architecture, out, check_shapes=False)
    return run_merge(plan, host).path


def read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def worst_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ``max|a − b| / max|b|`` over the tensors of two LoRA files (same keys)."""
    assert set(a) == set(b)
    return max(
        float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12))
        for k in b
        if b[k].numel() > 1
    )


def host_state(sd_model: Any, memory: Any) -> tuple:
    """Everything a merge must leave as it found: which ``forge_objects`` object, which
    patchers are loaded, and the UNet / text weights (fingerprints)."""
    original = sd_model.forge_objects_original
    return (
        id(sd_model.forge_objects),
        tuple(id(e.model) for e in memory.current_loaded_models),
        weights_fingerprint(original.unet.model.diffusion_model),
        weights_fingerprint(original.clip.cond_stage_model),
    )


def lora_patches(sd_model: Any, seed: int = 7, scale: float = 0.5) -> tuple[dict, dict]:
    """Random deltas (``{parameter key: ΔW}``) on layers the fixture LoRAs also touch
    (text q_proj, UNet attn2.to_k), keyed as the host's patchers key them."""
    gen = torch.Generator().manual_seed(seed)
    original = sd_model.forge_objects_original

    def pick(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict:
        return {
            name: torch.randn(p.shape, generator=gen) * scale
            for name, p in model.named_parameters()
            if name.endswith(suffixes)
        }

    unet = pick(original.unet.model, ("attn2.to_k.weight", "attn1.to_q.weight"))
    clip = pick(original.clip.cond_stage_model, ("self_attn.q_proj.weight",))
    assert unet and clip
    return unet, clip
