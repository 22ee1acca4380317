"""Pieces both Forge-family fakes use: Forge-style layers, the ldm-named UNet view, the
discrete sigma schedule, and the tiny pipeline's parts copied for one fake model."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sd_model import _attach  # the A1111 fakes' helper: ldm names over diffusers leaves

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.naming import ldm_unet_path


class ForgeLinear(torch.nn.Module):
    """Forge's operations Linear: an ``nn.Module`` that is *not* ``nn.Linear`` (forge.md
    §2.4). The weight may be stored in fp8 with an optional ``scale_weight``; forward casts
    it to the input's dtype, as ``get_weight_and_bias`` does."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.scale_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if getattr(weight, "bnb_quantized", False) or getattr(weight, "gguf_cls", None):
            raise RuntimeError("the fake cannot run packed weights")
        weight = weight.to(x.dtype)
        if self.scale_weight is not None:
            weight = weight * self.scale_weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


def forgeify(root: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``nn.Linear`` below ``root`` by a :class:`ForgeLinear` holding the same
    parameters (Forge builds its models with its own layer classes)."""
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, ForgeLinear(child))
        del name
    return root


_LEAVES = (ForgeLinear, torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


class LdmUNet(torch.nn.Module):
    """An ldm/sgm ``UNetModel`` as Forge's ``IntegratedUNet2DConditionModel`` names it,
    over a diffusers UNet's leaf modules; ``forward(x, timesteps, context, y, control,
    transformer_options)`` like ldm. SDXL's ``y`` is the already embedded ADM vector."""

    def __init__(self, unet: torch.nn.Module, arch: Architecture) -> None:
        super().__init__()
        object.__setattr__(self, "_unet", unet)  # not a child: only ldm names are listed
        self.arch = arch
        self.pooled = None
        if arch is Architecture.SDXL:
            # y arrives embedded; the diffusers UNet gets it as text_embeds + time part.
            unet.add_time_proj = torch.nn.Identity()
            time_dim = unet.config.addition_time_embed_dim
            self.pooled = unet.config.projection_class_embeddings_input_dim - 6 * time_dim
        for name, module in unet.named_modules():
            if isinstance(module, _LEAVES):
                try:
                    _attach(self, ldm_unet_path(name, arch), module)
                except InvalidInputError:
                    continue
        self.calls = 0

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if (y is not None) != (self.pooled is not None):
            raise AssertionError("must specify y if and only if the model is class-conditional")
        if transformer_options is not None:
            transformer_options["calls"] = transformer_options.get("calls", 0) + 1
        self.calls += 1
        extra = {}
        if y is not None:
            extra["added_cond_kwargs"] = {
                "text_embeds": y[:, : self.pooled],
                "time_ids": y[:, self.pooled :],
            }
        out = self._unet(x, timesteps, encoder_hidden_states=context, return_dict=False, **extra)
        return out[0]


@dataclass
class DiscreteSchedule:
    """A discrete k-diffusion schedule over 1000 DDPM steps (Forge's ``Prediction``,
    ComfyUI's ``ModelSamplingDiscrete``): ``sigmas``, sigma -> timestep by nearest log
    sigma, input scaling and denoised output for ε or v prediction."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        a = self.alphas_cumprod.double()
        self.sigmas = ((1 - a) / a).sqrt().float()
        self.log_sigmas = self.sigmas.log()
        self.sigma_data = 1.0

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log()[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))
        return x / (s**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(
        self, sigma: torch.Tensor, out: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        s = sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))
        if self.prediction_type == "v_prediction":
            d2 = self.sigma_data**2
            return x * d2 / (s**2 + d2) - out * s * self.sigma_data / (s**2 + d2) ** 0.5
        return x - out * s


def apply_in_sigma_space(
    schedule: DiscreteSchedule,
    diffusion_model: torch.nn.Module,
    dtype: torch.dtype,
    x: torch.Tensor,
    t: torch.Tensor,
    c_crossattn: torch.Tensor | None = None,
    transformer_options: dict | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``apply_model`` of both backends: ``t`` is sigma, ``x`` is in k-diffusion scaling,
    inputs are cast to the computation dtype, the denoised latents come back in fp32."""
    sigma = t
    xc = schedule.calculate_input(sigma, x).to(dtype)
    timestep = schedule.timestep(sigma).float()
    extra = {k: v.to(dtype) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    out = diffusion_model(
        xc,
        timestep,
        context=c_crossattn.to(dtype),
        transformer_options=transformer_options if transformer_options is not None else {},
        **extra,
    ).float()
    return schedule.calculate_denoised(sigma, out, x)


@dataclass
class TinyParts:
    """One fake model's own copies of a tiny pipeline's networks (weights can be merged
    into them without touching the pipeline a ``StandaloneHost`` runs)."""

    arch: Architecture
    unet: LdmUNet
    text: dict[str, torch.nn.Module]  # clip key -> HF text model
    tokenizers: dict[str, Any]
    alphas_cumprod: torch.Tensor
    prediction_type: str


def tiny_parts(pipe: Any, arch: Architecture) -> TinyParts:
    """Copy ``pipe``'s UNet and text encoders, with Forge-style Linear layers."""
    unet = forgeify(copy.deepcopy(pipe.unet))
    if arch is Architecture.SDXL:
        text = {
            "clip_l": forgeify(copy.deepcopy(pipe.text_encoder)),
            "clip_g": forgeify(copy.deepcopy(pipe.text_encoder_2)),
        }
        tokenizers = {"clip_l": pipe.tokenizer, "clip_g": pipe.tokenizer_2}
    else:
        key = "clip_h" if arch is Architecture.SD2 else "clip_l"
        text = {key: forgeify(copy.deepcopy(pipe.text_encoder))}
        tokenizers = {key: pipe.tokenizer}
    return TinyParts(
        arch=arch,
        unet=LdmUNet(unet, arch),
        text=text,
        tokenizers=tokenizers,
        alphas_cumprod=pipe.scheduler.alphas_cumprod.clone().float(),
        prediction_type=pipe.scheduler.config.prediction_type,
    )


def sdxl_time_embedding(size: int, dim: int, batch: int) -> torch.Tensor:
    """The size part of SDXL's ADM vector for original = target = ``size``, crop (0, 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    values = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)
    args = values[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(1, -1)
    return emb.expand(batch, -1)


def encode_prompts(parts: TinyParts, prompts: list[str], size: int = 1024) -> Any:
    """The host's text stage on the copied encoders: SD1/SD2 the last hidden state
    ``[B, 77, w]``; SDXL ``{"crossattn": both penultimate states, "vector": pooled + sizes}``
    (defaults 1024 px, as Forge without width/height attributes)."""

    def ids(key: str) -> torch.Tensor:
        tok = parts.tokenizers[key]
        return tok(
            prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).input_ids

    if parts.arch is not Architecture.SDXL:
        (key,) = parts.text
        return parts.text[key](ids(key))[0]
    out_l = parts.text["clip_l"](ids("clip_l"), output_hidden_states=True)
    out_g = parts.text["clip_g"](ids("clip_g"), output_hidden_states=True)
    crossattn = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    pooled = out_g.text_embeds
    time_dim = parts.unet._unet.config.addition_time_embed_dim
    vector = torch.cat([pooled, sdxl_time_embedding(size, time_dim, len(prompts))], dim=1)
    return {"crossattn": crossattn, "vector": vector}
