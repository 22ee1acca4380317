"""The merge host for the loaded model, and what the WebUI must forget after a merge.

Host modules (``backend.memory_management``, ``ldm_patched.modules.model_management``) are
looked up when a host is made, from ``sys.modules`` (the running WebUI has imported them),
so importing this module never imports a WebUI.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from loraclr_ext.errors import LoraClrError
from loraclr_ext.hosts.base import Host
from loraclr_ext.hosts.webui.a1111 import A1111Host
from loraclr_ext.hosts.webui.detect import HostKind, host_kind
from loraclr_ext.hosts.webui.forge import ForgeHost
from loraclr_ext.hosts.webui.reforge import ReforgeHost

FORGE_MEMORY = "backend.memory_management"
REFORGE_MEMORY = "ldm_patched.modules.model_management"


def host_module(name: str) -> Any:
    """A module of the running WebUI (``sys.modules`` first, then an import).

    Raises:
        LoraClrError: the module cannot be found (not the WebUI the model says it is).
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise LoraClrError(
            f"The loaded model looks like a Forge-family model but {name} cannot be "
            "imported; please report this with your WebUI version."
        ) from exc


def make_host(sd_model: Any, ctx: Any) -> Host:
    """The merge host for ``sd_model``.

    Args:
        sd_model: the loaded model (already reloaded on Forge, see ``WebuiContext.model``).
        ctx: the :class:`~loraclr_ext.ui.service.WebuiContext` (``devices``, ``networks``).
    """
    kind = host_kind(sd_model)
    networks = getattr(ctx, "networks", None)
    if kind is HostKind.FORGE:
        return ForgeHost(sd_model, host_module(FORGE_MEMORY), networks)
    if kind is HostKind.REFORGE:
        return ReforgeHost(sd_model, host_module(REFORGE_MEMORY), networks)
    return A1111Host(sd_model, ctx.devices, networks)


def forget_cached_loras(sd_model: Any, networks: Any, written: str | None = None) -> None:
    """Make the WebUI re-read and re-apply a LoRA file rewritten under the same name.

    Forge and reForge cache LoRA state dicts by file name (``networks.load_lora_state_dict``
    is an ``lru_cache``) and skip reloading when ``sd_model.current_lora_hash`` equals the
    prompt's LoRA list (forge.md §4). A1111 reloads the file by mtime but re-applies it to a
    layer only when the layer's ``network_current_names`` differ from the prompt's set, so
    the layers carrying ``written`` (the file stem just written) are marked stale.
    """
    if sd_model is None:
        return
    if not host_kind(sd_model).forge_family:
        if written:
            _mark_a1111_layers_stale(sd_model, written)
        return
    cache = getattr(networks, "load_lora_state_dict", None)
    if cache is not None and hasattr(cache, "cache_clear"):
        cache.cache_clear()
    if hasattr(sd_model, "current_lora_hash"):
        sd_model.current_lora_hash = str([])
    _invalidate_merged_patches(sd_model)


STALE_PATCHES = "loraclr: re-merge on next load"
"""A ``LoraLoader.loaded_hash`` no patch set has, so the next load re-merges."""


def _invalidate_merged_patches(sd_model: Any) -> None:
    """New Forge's ``LoraLoader`` (one per model) skips re-merging when the loaded patch
    set has the same keys, and a key is ``(filename, strengths, online)``: a generation
    with a LoRA rewritten under the same name would keep the old weights merged (seen in
    a real Forge). Its next ``refresh`` restores the backed-up weights first, so marking
    the loaded set stale is safe and costs one re-merge."""
    original = getattr(sd_model, "forge_objects_original", None)
    clip = getattr(original, "clip", None)
    for patcher in (getattr(original, "unet", None), getattr(clip, "patcher", None)):
        loader = getattr(patcher, "lora_loader", None)
        if loader is not None and hasattr(loader, "loaded_hash"):
            loader.loaded_hash = STALE_PATCHES


def _mark_a1111_layers_stale(sd_model: Any, written: str) -> None:
    """Give every layer whose applied set names ``written`` a set no prompt has: A1111's
    next ``network_apply_weights`` then restores the layer from its backup and applies
    what the prompt wants (the new file, or nothing). Weights are not touched here."""
    for module in getattr(sd_model, "network_layer_mapping", {}).values():
        names = getattr(module, "network_current_names", ())
        if any(isinstance(n, tuple) and n and n[0] == written for n in names):
            module.network_current_names = ((STALE_PATCHES, 0.0, 0.0, None),)
