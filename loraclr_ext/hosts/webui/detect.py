"""Which WebUI the loaded model comes from, and its architecture.

Detection reads the model object's attributes, never version strings (dossier forge.md
§6.1): the Forge family keeps its patchers in ``sd_model.forge_objects``; new Forge has
no ``sd_model.model`` at all, reForge (old Forge backend, ``ldm_patched``) keeps the A1111
``sd_model.model.diffusion_model``; AUTOMATIC1111 has neither.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from loraclr_ext.errors import InvalidInputError, NoModelError
from loraclr_ext.hosts.webui.a1111 import a1111_architecture
from loraclr_ext.model.architecture import Architecture

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
        raise NoModelError()
    if host_kind(sd_model) is HostKind.A1111:
        return a1111_architecture(sd_model)
    return forge_architecture(sd_model)
