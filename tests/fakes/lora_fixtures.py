"""LoRA files, merge options and state snapshots shared by the host and WebUI tests.

The LoRAs are small random kohya files written by the engine's own writer (fitting selective
concept LoRAs with ``demo.build_demo_loras`` takes minutes on a shared CPU, and these tests
need files, not selectivity)."""

from __future__ import annotations

from pathlib import Path

import torch

from loraclr_ext.files.metadata import LoraMetadata
from loraclr_ext.files.write import write_lora
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef

TEXT_LEAVES = ("layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj")
UNET_LEAVES = ("attn2.to_k", "attn2.to_v")


def random_lora(host, path: Path, trigger: str, seed: int, rank: int = 4) -> Path:
    """A kohya LoRA on ``host``'s attention layers with metadata trigger ``trigger``."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for ref in host.all_refs():
        if ref.path.endswith(TEXT_LEAVES + UNET_LEAVES):
            weight = host.base_weight(ref)
            out, inp = weight.shape
            up = torch.randn(out, rank, generator=gen) * 0.05
            down = torch.randn(rank, inp, generator=gen) * 0.05
            deltas[ref] = ModuleDelta(up, down, None)
    return write_lora(
        path,
        deltas,
        Architecture.SD1,
        LoraMetadata(title=trigger, triggers=[trigger]),
        overwrite=True,
        sidecar=False,
        check_shapes=False,
    )


def sdxl_lora(path: Path) -> Path:
    """A (tiny) SDXL LoRA: it targets the second text encoder, which SD1 does not have."""
    ref = ModuleRef("te2", "text_model.encoder.layers.0.self_attn.q_proj")
    delta = ModuleDelta(torch.ones(64, 2) * 0.01, torch.ones(2, 64) * 0.01, None)
    return write_lora(
        path,
        {ref: delta},
        Architecture.SDXL,
        LoraMetadata(triggers=["xlthing"]),
        overwrite=True,
        sidecar=False,
        check_shapes=False,
    )


FAST = {"steps": 1, "size": 64, "iterations": 0, "quality": False}
"""Merge options that keep a tiny CPU merge to a few seconds."""


def snapshot(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def fingerprint(model) -> tuple[str, str]:
    from loraclr_ext.hosts.weights import weights_fingerprint

    return (
        weights_fingerprint(model.model.diffusion_model),
        weights_fingerprint(model.cond_stage_model.wrapped.transformer),
    )
