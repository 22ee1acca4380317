"""Which WebUI the loaded model comes from, its architecture, and the merge host for it.

Detection reads the model object's attributes, never version strings (dossier forge.md
§6.1): the Forge family keeps its patchers in ``sd_model.forge_objects``; new Forge has
no ``sd_model.model`` at all, reForge (old Forge backend, ``ldm_patched``) keeps the A1111
``sd_model.model.diffusion_model``; AUTOMATIC1111 has neither.

Host modules (``backend.memory_management``, ``ldm_patched.modules.model_management``) are
looked up when a host is made, from ``sys.modules`` (the running WebUI has imported them),
so importing this module never imports a WebUI.
"""

from __future__ import annotations

import importlib
import sys
from enum import Enum
from typing import Any

from loraclr_ext.architecture import Architecture
from loraclr_ext.errors import InvalidInputError, LoraClrError
from loraclr_ext.hosts.base import Host
from loraclr_ext.webui.a1111_host import NO_MODEL, NoModelError
from loraclr_ext.webui.a1111_host import model_architecture as a1111_architecture

FORGE_MEMORY = "backend.memory_management"
REFORGE_MEMORY = "ldm_patched.modules.model_management"
UNSUPPORTED_FAMILY = (
    "LoRACLR Merge supports SD 1.x, SD 2.x and SDXL checkpoints; load one of those (or "
    "merge on the command line) and try again."
)


class HostKind(str, Enum):
    """The WebUI a model object belongs to."""

    A1111 = "a1111"
    FORGE = "forge"
    REFORGE = "reforge"

    @property
    def label(self) -> str:
        return {"a1111": "AUTOMATIC1111", "forge": "Forge", "reforge": "reForge"}[self.value]

    @property
    def forge_family(self) -> bool:
        """Forge and reForge: LoRA state lives in patchers and caches (forge.md §4)."""
        return self is not HostKind.A1111


def host_kind(sd_model: Any) -> HostKind:
    """Forge when the model has ``forge_objects`` but no ``model``; reForge when it has
    ``forge_objects`` and ``model.diffusion_model``; AUTOMATIC1111 otherwise."""
    if getattr(sd_model, "forge_objects", None) is None:
        return HostKind.A1111
    inner = getattr(sd_model, "model", None)
    if inner is not None and getattr(inner, "diffusion_model", None) is not None:
        return HostKind.REFORGE
    return HostKind.FORGE


def is_loaded(sd_model: Any) -> bool:
    """A real checkpoint, not ``None`` nor Forge's ``FakeInitialModel`` (which has neither
    patchers nor an inner model until ``sd_models.forge_model_reload()`` runs)."""
    if sd_model is None:
        return False
    return getattr(sd_model, "forge_objects", None) is not None or hasattr(sd_model, "model")


def forge_architecture(sd_model: Any) -> Architecture:
    """The family of a Forge / reForge engine from its ``is_*`` flags.

    Raises:
        InvalidInputError: SD3 (``is_sd3``) or no SD flag at all (Flux, Chroma, …).
    """
    if getattr(sd_model, "is_sd3", False):
        raise InvalidInputError(
            f"The loaded checkpoint is SD3, not a UNet model. {UNSUPPORTED_FAMILY}"
        )
    for flag, arch in (
        ("is_sdxl", Architecture.SDXL),
        ("is_sd2", Architecture.SD2),
        ("is_sd1", Architecture.SD1),
    ):
        if getattr(sd_model, flag, False):
            return arch
    raise InvalidInputError(
        "The loaded checkpoint is not SD 1.x, SD 2.x or SDXL (Flux, Chroma or another "
        f"transformer family). {UNSUPPORTED_FAMILY}"
    )


def model_architecture(sd_model: Any) -> Architecture:
    """The architecture of the loaded model on any of the three WebUIs.

    Raises:
        NoModelError: no checkpoint (or Forge's placeholder before the first load).
        InvalidInputError: a family the merge does not support.
    """
    if not is_loaded(sd_model):
        raise NoModelError(NO_MODEL)
    if host_kind(sd_model) is HostKind.A1111:
        return a1111_architecture(sd_model)
    return forge_architecture(sd_model)


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
        ctx: the :class:`~loraclr_ext.webui.service.WebuiContext` (``devices``, ``networks``).
    """
    kind = host_kind(sd_model)
    networks = getattr(ctx, "networks", None)
    if kind is HostKind.FORGE:
        from loraclr_ext.webui.forge_host import ForgeHost

        return ForgeHost(sd_model, host_module(FORGE_MEMORY), networks)
    if kind is HostKind.REFORGE:
        from loraclr_ext.webui.reforge_host import ReforgeHost

        return ReforgeHost(sd_model, host_module(REFORGE_MEMORY), networks)
    from loraclr_ext.webui.a1111_host import A1111Host

    return A1111Host(sd_model, ctx.devices, networks)


def forget_cached_loras(sd_model: Any, networks: Any) -> None:
    """Make a Forge-family WebUI re-read a LoRA file rewritten under the same name.

    Forge and reForge cache LoRA state dicts by file name (``networks.load_lora_state_dict``
    is an ``lru_cache``) and skip reloading when ``sd_model.current_lora_hash`` equals the
    prompt's LoRA list (forge.md §4); A1111 reloads by file mtime and needs nothing.
    """
    if sd_model is None or not host_kind(sd_model).forge_family:
        return
    cache = getattr(networks, "load_lora_state_dict", None)
    if hasattr(cache, "cache_clear"):
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
