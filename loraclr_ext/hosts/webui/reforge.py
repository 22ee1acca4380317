"""reForge ``main`` (A1111 front end on the old Forge backend, ``ldm_patched``) behind the
Host protocol.

The model object looks like A1111's (dossier forge.md §5): ``sd_model.model.diffusion_model``
(the same ldm-named module as ``forge_objects.unet.model.diffusion_model``),
``get_learned_conditioning``, ``alphas_cumprod``, ``parameterization`` and the ``is_*``
flags. LoRAs, however, are handled the Forge way: ComfyUI-style patchers in
``forge_objects*`` merge them into the shared weights and keep backups, and loading the
clean ``forge_objects_original`` patchers through
``ldm_patched.modules.model_management.load_models_gpu`` un-merges them. Text encoders are
HF-layout modules under ``forge_objects_original.clip.cond_stage_model.clip_*.transformer``.

Everything but the locations is :class:`~loraclr_ext.hosts.webui.patcher.PatcherHost`.
"""

from __future__ import annotations

from typing import Any

import torch

from loraclr_ext.hosts.webui.patcher import PatcherHost


class ReforgeHost(PatcherHost):
    """reForge's loaded checkpoint as a merge host.

    The UNet is run through the ComfyUI ``BaseModel.apply_model(x, sigma, c_crossattn=…,
    y=…)`` of the clean patcher; its ``model_sampling`` holds the sigmas.
    """

    host_label = "reForge"

    def _unet_module(self) -> torch.nn.Module:
        return self.sd_model.model.diffusion_model

    def _compute_dtype(self) -> torch.dtype:
        for owner, name in (
            (self.unet_patcher, "model_dtype"),
            (self.unet_patcher.model, "get_dtype"),
        ):
            getter = getattr(owner, name, None)
            if callable(getter):
                dtype = getter()
                if isinstance(dtype, torch.dtype):
                    return dtype
        dtype = getattr(self.unet, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.unet.parameters()).dtype

    def _sigmas(self) -> torch.Tensor:
        sampling = getattr(self.unet_patcher.model, "model_sampling", None)
        sigmas = getattr(sampling, "sigmas", None)
        if sigmas is None:
            alphas = self.sd_model.alphas_cumprod.detach().cpu().double()  # no fp64 on MPS
            sigmas = ((1 - alphas) / alphas).sqrt().float()
        return sigmas

    def _v_prediction(self) -> bool:
        if getattr(self.sd_model, "parameterization", None) == "v":
            return True
        sampling = getattr(self.unet_patcher.model, "model_sampling", None)
        return any("V_PREDICTION" in cls.__name__.upper() for cls in type(sampling).__mro__)

    def _tokenizer_candidates(self, key: str) -> list[Any]:
        clip_tokenizer = getattr(self.clip, "tokenizer", None)
        comfy = getattr(clip_tokenizer, key, None)
        embedders = getattr(getattr(self.sd_model, "conditioner", None), "embedders", None) or []
        return [
            getattr(getattr(self.sd_model, "cond_stage_model", None), "tokenizer", None),
            getattr(embedders[0], "tokenizer", None) if embedders else None,
            getattr(comfy, "tokenizer", None),
        ]
