"""The AUTOMATIC1111 1.10 loaded checkpoint (``shared.sd_model``) behind the Host protocol.

The UNet is ``sd_model.model.diffusion_model`` with ldm names, the SD1 text encoder is
the HF CLIP at ``sd_model.cond_stage_model.wrapped.transformer``. Text goes through
``sd_model.get_learned_conditioning`` (the path generation takes: clip skip, emphasis),
denoising through ``sd_model.apply_model(x, t, cond)`` with DDPM timesteps and the
model's own ``alphas_cumprod``. LoRAs the built-in Lora extension merged into the weights
are taken out before the merge and put back afterwards, so the model ends exactly as it
was (dossier §4.6).

SD2 and SDXL (open_clip fused ``in_proj`` text encoders) are refused with a clear message
for now.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from loraclr_ext.architecture import Architecture
from loraclr_ext.errors import InvalidInputError, LoraClrError
from loraclr_ext.hosts.base import Conditioning, StepCallback, Tokens, iter_chunks
from loraclr_ext.hosts.standalone import has_text_model_level, live_text_path, weights_fingerprint
from loraclr_ext.naming import ldm_unet_path
from loraclr_ext.targets import ModuleRef

ENCODE_CHUNK = 16


class NoModelError(LoraClrError):
    """No checkpoint is loaded in the WebUI."""


def model_architecture(sd_model: Any) -> Architecture:
    """The family of an A1111 model from its ``is_*`` flags.

    Raises:
        NoModelError: no model.
        InvalidInputError: SD3, SSD-1B, SD2 or SDXL (not supported by this adapter yet).
    """
    if sd_model is None:
        raise NoModelError(
            "No checkpoint is loaded; pick one in the Stable Diffusion checkpoint menu first."
        )
    if getattr(sd_model, "is_sd3", False) or getattr(sd_model, "is_ssd", False):
        raise InvalidInputError("The loaded checkpoint (SD3 / SSD-1B) is not supported.")
    if getattr(sd_model, "is_sdxl", False) or getattr(sd_model, "is_sd2", False):
        kind = "SDXL" if getattr(sd_model, "is_sdxl", False) else "SD 2.x"
        raise InvalidInputError(
            f"The loaded checkpoint is {kind}; merging in the WebUI supports SD 1.x "
            "checkpoints for now. Load an SD 1.x checkpoint, or use the command line "
            "(python -m loraclr_ext merge) for SD 2.x / SDXL."
        )
    return Architecture.SD1


@dataclass
class _Saved:
    """A module's LoRA-merged weights, kept while the clean weights are in place."""

    module: torch.nn.Module
    names: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _weight_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the Lora extension overwrites in place: weight and bias (MHA: in_proj
    and out_proj weight / bias)."""
    names = ("weight", "bias", "in_proj_weight", "in_proj_bias")
    found = {n: t for n in names if isinstance(t := getattr(module, n, None), torch.Tensor)}
    out = getattr(module, "out_proj", None)
    if out is not None:
        found.update({f"out_proj.{n}": t for n, t in _weight_tensors(out).items()})
    return found


class A1111Host:
    """The WebUI's loaded SD1 model as a merge host.

    Args:
        sd_model: ``modules.sd_models.model_data.sd_model``.
        devices: ``modules.devices`` (``device``, ``autocast``).
        networks: the built-in Lora extension's ``networks`` module, or ``None``.
    """

    def __init__(self, sd_model: Any, devices: Any, networks: Any = None) -> None:
        self.architecture = model_architecture(sd_model)
        self.sd_model = sd_model
        self.devices = devices
        self.networks = networks
        self.unet: torch.nn.Module = sd_model.model.diffusion_model
        self.text: torch.nn.Module = sd_model.cond_stage_model.wrapped.transformer
        self.tokenizer = sd_model.cond_stage_model.wrapped.tokenizer
        self.device = torch.device(getattr(devices, "device", "cpu"))
        self.dtype = next(self.unet.parameters()).dtype

    # -- modules

    def modules(self, refs: Iterable[ModuleRef]) -> dict[ModuleRef, torch.nn.Module]:
        """Live modules for ``refs`` (UNet via ldm names); missing ones are left out."""
        level = has_text_model_level(self.text)
        found: dict[ModuleRef, torch.nn.Module] = {}
        for ref in refs:
            try:
                if ref.component == "unet":
                    found[ref] = self.unet.get_submodule(ldm_unet_path(ref.path, self.architecture))
                elif ref.component == "te1":
                    found[ref] = self.text.get_submodule(live_text_path(ref.path, level))
            except (AttributeError, InvalidInputError):
                continue
        return found

    def base_weight(self, ref: ModuleRef) -> torch.Tensor:
        """CPU fp32 copy ``[out, in·kh·kw]`` (works for fp8 storage and lowvram too)."""
        found = self.modules([ref])
        if ref not in found:
            raise InvalidInputError(f"The loaded model has no module {ref}.")
        weight = found[ref].weight
        return weight.detach().to("cpu", torch.float32).reshape(weight.shape[0], -1).clone()

    # -- text

    def tokenize(self, prompts: list[str]) -> Tokens:
        tok = self.tokenizer
        ids = tok(prompts, padding=False, truncation=True, max_length=tok.model_max_length)
        return Tokens(ids=[list(map(int, x)) for x in ids.input_ids], length=tok.model_max_length)

    def encode(self, prompts: list[str]) -> Conditioning:
        """``sd_model.get_learned_conditioning``; only the first 77 tokens are kept."""
        if not prompts:
            raise InvalidInputError("No prompts to encode.")
        chunks = []
        with self.devices.autocast():
            for chunk in iter_chunks(list(prompts), ENCODE_CHUNK):
                cond = self.sd_model.get_learned_conditioning(chunk)
                chunks.append(cond[:, : self.tokenizer.model_max_length].float())
        return Conditioning(context=torch.cat(chunks))

    # -- denoising

    def _alphas(self) -> torch.Tensor:
        return self.sd_model.alphas_cumprod.detach().to("cpu", torch.float64)

    def _eps(self, x: torch.Tensor, t: int, out: torch.Tensor, alpha: float) -> torch.Tensor:
        if getattr(self.sd_model, "parameterization", "eps") == "v":
            return alpha**0.5 * out + (1 - alpha) ** 0.5 * x
        return out

    def predict_noise(
        self, latents: torch.Tensor, timestep: int, cond: Conditioning
    ) -> torch.Tensor:
        """One ``apply_model`` call; returns ε or v like the model does."""
        x = latents.to(self.device)
        t = torch.full((x.shape[0],), int(timestep), device=self.device, dtype=torch.long)
        with self.devices.autocast():
            out = self.sd_model.apply_model(x, t, cond.context.to(self.device))
        return out.float()

    def sample(
        self,
        cond: Conditioning,
        *,
        steps: int,
        size: int,
        seed: int,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM (η = 0) over ``steps`` evenly spaced DDPM timesteps, no CFG;
        CPU-generated noise, so runs agree across devices."""
        if steps < 1 or size < 8 or size % 8:
            raise InvalidInputError(f"Bad sampling settings: steps={steps}, size={size}.")
        alphas = self._alphas()
        n = alphas.shape[0]
        timesteps = torch.linspace(n - 1, 0, steps).round().long().tolist()
        gen = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((cond.context.shape[0], 4, size // 8, size // 8), generator=gen).double()
        for i, t in enumerate(timesteps):
            a = float(alphas[t])
            a_prev = float(alphas[timesteps[i + 1]]) if i + 1 < steps else 1.0
            out = self.predict_noise(x.float(), t, cond).double().cpu()
            eps = self._eps(x, t, out, a)
            x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            if callback is not None:
                callback(i, steps)
        return x.float()

    # -- weight guard

    def _models(self) -> list[torch.nn.Module]:
        return [self.unet, self.text]

    @contextmanager
    def clean_weights(self) -> Iterator[None]:
        """Take the Lora extension's merged LoRAs out, run, put everything back.

        Afterwards every UNet / text-encoder weight is bit-identical to before (checked by
        fingerprint), also after an error or an interrupt.
        """
        before = [weights_fingerprint(m) for m in self._models()]
        saved, loaded = self._unmerge_host_loras()
        try:
            yield
        finally:
            self._remerge(saved, loaded)
            changed = [
                type(m).__name__
                for m, fp in zip(self._models(), before, strict=True)
                if weights_fingerprint(m) != fp
            ]
            if changed:
                raise LoraClrError(
                    f"Weights of {', '.join(changed)} changed during the merge; restart the "
                    "WebUI or reload the checkpoint before generating."
                )

    def _unmerge_host_loras(self) -> tuple[list[_Saved], list[Any] | None]:
        """Restore clean weights from the Lora extension's backups (dossier §4.6)."""
        nets = self.networks
        if nets is None or not hasattr(nets, "network_restore_weights_from_backup"):
            return [], None
        loaded = list(getattr(nets, "loaded_networks", []))
        saved: list[_Saved] = []
        for module in getattr(self.sd_model, "network_layer_mapping", {}).values():
            names = getattr(module, "network_current_names", ())
            if not names:
                continue
            tensors = {
                k: t.detach().to("cpu", copy=True) for k, t in _weight_tensors(module).items()
            }
            saved.append(_Saved(module, names, tensors))
            nets.network_restore_weights_from_backup(module)
            module.network_current_names = ()
        nets.loaded_networks.clear()
        return saved, loaded

    def _remerge(self, saved: list[_Saved], loaded: list[Any] | None) -> None:
        """Put the LoRA-merged weights and the Lora extension's state back."""
        with torch.no_grad():
            for item in saved:
                live = _weight_tensors(item.module)
                for name, tensor in item.tensors.items():
                    live[name].copy_(tensor)
                item.module.network_current_names = item.names
        if loaded is not None:
            self.networks.loaded_networks[:] = loaded
