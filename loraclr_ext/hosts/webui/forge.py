"""Stable Diffusion WebUI Forge (new ``backend/``) behind the Host protocol.

Forge keeps the model in patchers (dossier forge.md §2.2); everything the merge does with
them is :class:`~loraclr_ext.hosts.webui.patcher.PatcherHost`. This module says where new
Forge keeps the UNet (``forge_objects_original.unet.model.diffusion_model``), the schedule
and prediction type (``unet.model.predictor``), the compute dtype and the tokenizer, and
that Forge runs its model code under ``torch.inference_mode``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from loraclr_ext.hosts.webui.patcher import PatcherHost, get_item


class ForgeHost(PatcherHost):
    """New Forge (``backend/``): UNet ``forge_objects_original.unet.model.diffusion_model``,
    schedule and prediction type from ``unet.model.predictor``, compute dtype
    ``unet.model.computation_dtype`` (forge.md §2.2, §2.6)."""

    host_label = "Forge"

    def host_mode(self) -> AbstractContextManager[Any]:
        """New Forge builds, patches, conditions and samples under ``torch.inference_mode``."""
        return torch.inference_mode()

    def _unet_module(self) -> torch.nn.Module:
        return self.unet_patcher.model.diffusion_model

    def _compute_dtype(self) -> torch.dtype:
        dtype = getattr(self.unet_patcher.model, "computation_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.unet.parameters()).dtype

    def _sigmas(self) -> torch.Tensor:
        predictor = self.unet_patcher.model.predictor
        sigmas = getattr(predictor, "sigmas", None)
        if sigmas is None:
            stored = predictor.alphas_cumprod.detach()
            alphas = stored.cpu().double()  # fp64 on the CPU: MPS has none
            sigmas = ((1 - alphas) / alphas).sqrt().float().to(stored.device)
        return sigmas

    def _v_prediction(self) -> bool:
        kind = getattr(self.unet_patcher.model.predictor, "prediction_type", "epsilon")
        return str(kind).lower() in ("v_prediction", "v")

    def _tokenizer_candidates(self, key: str) -> list[Any]:
        engine = getattr(self.sd_model, "text_processing_engine", None) or getattr(
            self.sd_model, "text_processing_engine_l", None
        )
        return [get_item(self.clip.tokenizer, key), getattr(engine, "tokenizer", None)]
