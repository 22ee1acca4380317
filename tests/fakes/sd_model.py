"""A tiny diffusers SD1 pipeline dressed as an A1111 SD1 model (dossier §3.1, §3.2, §4.4).

The layout is the real one the adapter reads: ``model.diffusion_model`` whose modules carry
ldm names (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``; the leaves are the
pipeline's own modules), ``cond_stage_model.wrapped.transformer`` / ``.tokenizer``,
``get_learned_conditioning(list[str])``, ``apply_model(x, t, cond)`` with DDPM timesteps,
``alphas_cumprod``, the ``is_*`` flags and the Lora extension's ``network_layer_mapping``.
"""

from __future__ import annotations

from typing import Any

import torch

from loraclr_ext.architecture import Architecture
from loraclr_ext.errors import InvalidInputError
from loraclr_ext.naming import ldm_unet_path

_LEAVES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _attach(root: torch.nn.Module, path: str, leaf: torch.nn.Module) -> None:
    *parents, last = path.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, torch.nn.Module())
        node = node._modules[part]
    node.add_module(last, leaf)


class LdmUNetView(torch.nn.Module):
    """ldm ``UNetModel`` names over a diffusers UNet's leaf modules; ``forward(x,
    timesteps, context)`` like ldm."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_unet", unet)  # not a child: only ldm names are listed
        for name, module in unet.named_modules():
            if isinstance(module, _LEAVES):
                try:
                    _attach(self, ldm_unet_path(name, Architecture.SD1), module)
                except InvalidInputError:
                    continue

    def forward(self, x, timesteps=None, context=None, **kwargs):
        return self._unet(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.diffusion_model = LdmUNetView(unet)

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class FrozenCLIPEmbedder(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """The hijack wrapper: prompts in, ``[B, 77, C]`` out (no emphasis, clip skip 1)."""

    def __init__(self, wrapped: FrozenCLIPEmbedder) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts: list[str]) -> torch.Tensor:
        tok = self.wrapped.tokenizer
        ids = tok(
            texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).input_ids
        return self.wrapped.transformer(ids)[0]


class FakeSdModel(torch.nn.Module):
    """``shared.sd_model`` for SD1."""

    is_sd1, is_sd2, is_sdxl, is_ssd, is_sd3 = True, False, False, False, False
    parameterization = "eps"
    lowvram = False

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.model = DiffusionWrapper(pipe.unet)
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(
            FrozenCLIPEmbedder(pipe.text_encoder, pipe.tokenizer)
        )
        self.register_buffer("alphas_cumprod", pipe.scheduler.alphas_cumprod.clone().float())
        self.apply_calls = 0
        self.network_layer_mapping = {}
        for root in (self.model, self.cond_stage_model.wrapped):
            for name, module in root.named_modules():
                key = name.replace(".", "_")
                self.network_layer_mapping[key] = module
                module.network_layer_name = key

    def get_learned_conditioning(self, c: list[str]) -> torch.Tensor:
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        self.apply_calls += 1
        if not isinstance(cond, dict):
            cond = {"c_crossattn": [cond]}
        return self.model(x_noisy, t, **cond)
