"""The built-in Lora extension's bare ``networks`` module (dossier §4.2, §4.6), reduced to
what the merge touches: the file list and weight restore from the CPU backups."""

from __future__ import annotations

import os

import torch
from modules import shared

available_networks: dict[str, str] = {}
loaded_networks: list = []
refresh_calls = 0


def list_available_networks() -> None:
    global refresh_calls
    refresh_calls += 1
    available_networks.clear()
    for folder, _, files in os.walk(shared.cmd_opts.lora_dir):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext in (".safetensors", ".pt", ".ckpt"):
                available_networks[stem] = os.path.join(folder, name)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
    loaded_networks.clear()


def network_restore_weights_from_backup(module: torch.nn.Module) -> None:
    backup = getattr(module, "network_weights_backup", None)
    if backup is not None:
        with torch.no_grad():
            module.weight.copy_(backup)
