"""Stable Diffusion WebUI Forge (new ``backend/``) behind the Host protocol.

Forge keeps the model in patchers (dossier forge.md §2.2): the clean ones are
``sd_model.forge_objects_original`` (``unet``: a ``UnetPatcher`` whose ``model`` is a
``KModel``; ``clip``: a ``CLIP`` whose ``cond_stage_model`` holds ``clip_l`` / ``clip_h`` /
``clip_g``, each an HF ``CLIPTextModel`` under ``.transformer``). A generation leaves its
LoRAs merged into the shared weights; loading the clean patchers through
``memory_management.load_models_gpu`` restores the backed-up weights (§3.5). So the merge
runs with the original patchers loaded and ``sd_model.forge_objects`` pointing at a copy of
them, and afterwards reloads what was loaded before and puts ``forge_objects`` back.

Rules that come from Forge's internals: never move host modules or write their weights
(only ``load_models_gpu`` does); layers are not ``nn.Linear`` (modules are found by name);
parameters and conditionings are inference tensors (cloned before they reach the solver);
there is no autocast (inputs are cast to the UNet's computation dtype).

:class:`PatcherHost` holds what Forge and reForge share; :class:`ForgeHost` adds where new
Forge keeps the UNet, the schedule and the dtypes.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from loraclr_ext.errors import InvalidInputError, LoraClrError
from loraclr_ext.hosts.base import Conditioning, StepCallback, Tokens, iter_chunks
from loraclr_ext.hosts.ddim import ddim_sample
from loraclr_ext.hosts.text_paths import has_text_model_level, live_text_path
from loraclr_ext.hosts.webui.detect import forge_architecture
from loraclr_ext.hosts.weights import changed_weights, weights_fingerprint
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.naming import ldm_unet_path
from loraclr_ext.model.targets import ModuleRef

log = logging.getLogger("loraclr")
ENCODE_CHUNK = 16
CLIP_TOKENS = 77
"""Tokens per CLIP pass: BOS, 75 prompt tokens, EOS/padding."""
TEXT_KEYS: dict[Architecture, dict[str, str]] = {
    Architecture.SD1: {"te1": "clip_l"},
    Architecture.SD2: {"te1": "clip_h"},
    Architecture.SDXL: {"te1": "clip_l", "te2": "clip_g"},
}
"""Canonical text component -> key in ``clip.cond_stage_model`` (forge.md §2.2, §3.3)."""
SDXL_POOLED = 1280
SDXL_MICRO_CONDITIONS = 6
"""SDXL's ADM vector: pooled text embedding, then original size (h, w), crop (top, left)
and target size (h, w), each number as a sinusoidal embedding."""


# ------------------------------------------------------------------------------ helpers


def quantised_storage(tensor: torch.Tensor) -> str | None:
    """What kind of packed storage ``tensor`` uses, or ``None`` for plain float storage.

    fp8 counts as plain: it converts to fp32 exactly (times ``scale_weight`` where set).
    bitsandbytes nf4/fp4 (``bnb_quantized``) and GGUF (``gguf_cls``) pack several weights
    per byte; their tensors do not even have the layer's shape.
    """
    if getattr(tensor, "bnb_quantized", False) or type(tensor).__name__ == "Params4bit":
        return "nf4/fp4 (bitsandbytes)"
    if getattr(tensor, "gguf_cls", None) is not None or type(tensor).__name__ == "ParameterGGUF":
        return "GGUF"
    if not tensor.is_floating_point():
        return f"integer ({tensor.dtype})"
    return None


def check_storage(models: dict[str, torch.nn.Module]) -> None:
    """Refuse quantised checkpoints before anything runs.

    Raises:
        InvalidInputError: a weight is nf4/fp4, GGUF or integer-packed.
    """
    for label, model in models.items():
        for name, param in model.named_parameters():
            kind = quantised_storage(param)
            if kind is not None:
                raise InvalidInputError(
                    f"The loaded checkpoint stores its {label} weights as {kind} "
                    f"(e.g. {name}); the merge needs unpacked base weights. Load an "
                    "fp16/bf16/fp8 checkpoint, or set 'Diffusion in Low Bits' to "
                    "Automatic, and try again."
                )


def float_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as CPU fp32 ``[out, in·kh·kw]``, fp8 storage dequantised with
    the module's ``scale_weight`` (scalar or per output) where it has one."""
    weight = module.weight
    kind = quantised_storage(weight)
    if kind is not None:
        raise InvalidInputError(f"A weight is stored as {kind}; cannot read it.")
    w = weight.detach().to("cpu", torch.float32)
    scale = getattr(module, "scale_weight", None)
    if isinstance(scale, torch.Tensor):
        s = scale.detach().to("cpu", torch.float32)
        if s.numel() == 1:
            w = w * s.reshape(())
        elif s.numel() == w.shape[0]:
            w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
        else:
            raise InvalidInputError(
                f"Unexpected scale_weight of shape {tuple(s.shape)} for a weight of shape "
                f"{tuple(w.shape)}."
            )
    return w.reshape(w.shape[0], -1).clone()


def without_grad_decorator(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` without torch's grad-mode decorator, if it has one.

    Forge's ``get_learned_conditioning`` is ``@torch.inference_mode()``: every tensor the
    merge's forward hooks create inside it (token samples, neutral Grams) would be an
    inference tensor, which the solver's autograd refinement cannot use. The caller runs
    the undecorated function under ``torch.no_grad()`` instead, which is equivalent for the
    host's own computation. Any other decorator is left in place.
    """
    inner = getattr(method, "__wrapped__", None)
    wrapper = getattr(method, "__func__", method)
    code = getattr(wrapper, "__code__", None)
    from_torch = code is not None and code.co_filename.replace("\\", "/").endswith(
        "torch/utils/_contextlib.py"
    )
    if inner is None or not from_torch:
        return method
    owner = getattr(method, "__self__", None)
    return functools.partial(inner, owner) if owner is not None else inner


def sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    """ldm's ``timestep_embedding`` (cos half, then sin half) of each value: ``[n, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _get(container: Any, key: str) -> Any:
    """``container.key`` or ``container[key]`` (ModuleDict, ObjectDict or plain object)."""
    value = getattr(container, key, None)
    if value is None and hasattr(container, "__getitem__"):
        try:
            value = container[key]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


# ------------------------------------------------------------------------- shared host


class PatcherHost:
    """What Forge and reForge share: clean patchers, HF text encoders by key, sigma-space
    ``apply_model``, and the weight guard. Subclasses say where the UNet, the schedule,
    the dtypes and the tokenizer are.

    Args:
        sd_model: the loaded engine (``shared.sd_model`` after a reload).
        memory: the host's memory-management module (``load_models_gpu``,
            ``current_loaded_models``, ``get_torch_device``).
        networks: the built-in Lora extension's ``networks`` module, or ``None``.
    """

    host_label = "Forge"

    def __init__(self, sd_model: Any, memory: Any, networks: Any = None) -> None:
        self.architecture = forge_architecture(sd_model)
        self.sd_model = sd_model
        self.memory = memory
        self.networks = networks
        self.original = sd_model.forge_objects_original
        self.unet_patcher = self.original.unet
        self.clip = self.original.clip
        self.unet: torch.nn.Module = self._unet_module()
        self.text: dict[str, torch.nn.Module] = self._text_modules()
        self.tokenizer = self._tokenizer()
        self.chunk_length = self._chunk_length()
        get_device = getattr(memory, "get_torch_device", None)
        self.device = torch.device(get_device() if callable(get_device) else self._param_device())
        self.dtype: torch.dtype = self._compute_dtype()
        check_storage({"UNet": self.unet, **{f"text encoder {k}": m for k, m in self.text.items()}})

    # -- what subclasses provide

    def _unet_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def _compute_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _sigmas(self) -> torch.Tensor:
        """The model's discrete sigmas ``[1000]`` (index = DDPM timestep)."""
        raise NotImplementedError

    def _v_prediction(self) -> bool:
        raise NotImplementedError

    def _tokenizer_candidates(self, key: str) -> list[Any]:
        raise NotImplementedError

    # -- construction helpers

    def _param_device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _text_modules(self) -> dict[str, torch.nn.Module]:
        encoders = self.clip.cond_stage_model
        found: dict[str, torch.nn.Module] = {}
        for component, key in TEXT_KEYS[self.architecture].items():
            wrapper = _get(encoders, key)
            transformer = getattr(wrapper, "transformer", None)
            if not isinstance(transformer, torch.nn.Module):
                raise InvalidInputError(
                    f"The loaded {self.architecture.label} checkpoint has no '{key}' text "
                    "encoder (an SDXL refiner?); merging needs the base model."
                )
            found[component] = transformer
        return found

    def _tokenizer(self) -> Any:
        key = TEXT_KEYS[self.architecture]["te1"]
        for candidate in self._tokenizer_candidates(key):
            if candidate is not None and hasattr(candidate, "model_max_length"):
                return candidate
        raise LoraClrError(
            f"Cannot find the {self.host_label} tokenizer of '{key}'; please report this with "
            "your WebUI version."
        )

    # -- modules

    def modules(self, refs: Iterable[ModuleRef]) -> dict[ModuleRef, torch.nn.Module]:
        """Live modules for ``refs`` (UNet by ldm name, text by HF name); missing ones are
        left out."""
        levels = {c: has_text_model_level(m) for c, m in self.text.items()}
        found: dict[ModuleRef, torch.nn.Module] = {}
        for ref in refs:
            try:
                if ref.component == "unet":
                    path = ldm_unet_path(ref.path, self.architecture)
                    found[ref] = self.unet.get_submodule(path)
                elif ref.component in self.text:
                    path = live_text_path(ref.path, levels[ref.component])
                    found[ref] = self.text[ref.component].get_submodule(path)
            except (AttributeError, InvalidInputError):
                continue
        return found

    def base_weight(self, ref: ModuleRef) -> torch.Tensor:
        """CPU fp32 copy ``[out, in·kh·kw]`` (fp8 storage dequantised)."""
        found = self.modules([ref])
        if ref not in found:
            raise InvalidInputError(f"The loaded model has no module {ref}.")
        return float_weight(found[ref])

    # -- text

    def tokenize(self, prompts: list[str]) -> Tokens:
        tok = self.tokenizer
        length = self.chunk_length
        ids = tok(prompts, padding=False, truncation=True, max_length=length)
        return Tokens(ids=[list(map(int, x)) for x in ids.input_ids], length=length)

    def _chunk_length(self) -> int:
        """Tokens per text-encoder pass (77 for CLIP): the first encoder's position
        count. The tokenizer's ``model_max_length`` cannot be trusted: reForge's
        ldm_patched tokenizer files say 8192 (seen in a real reForge)."""
        for name, module in self.text["te1"].named_modules():
            if name.endswith("position_embedding") and hasattr(module, "num_embeddings"):
                return int(module.num_embeddings)
        return min(int(self.tokenizer.model_max_length), CLIP_TOKENS)

    def _pooled_width(self) -> int:
        projection = getattr(self.text.get("te2"), "text_projection", None)
        weight = getattr(projection, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else SDXL_POOLED

    def encode(self, prompts: list[str]) -> Conditioning:
        """``sd_model.get_learned_conditioning`` (clip skip, emphasis and embeddings as in
        generation); the first 77 tokens. SDXL: the ADM vector's pooled part is kept as
        ``pooled`` ``[B, 1280]``; the size part is rebuilt for each run's image size."""
        if not prompts:
            raise InvalidInputError("No prompts to encode.")
        condition = without_grad_decorator(self.sd_model.get_learned_conditioning)
        length = self.chunk_length
        contexts: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        for chunk in iter_chunks(list(prompts), ENCODE_CHUNK):
            with torch.no_grad():
                cond = condition(chunk)
            if isinstance(cond, dict):
                context = cond["crossattn"]
                vector = cond.get("vector")
                if self.architecture is Architecture.SDXL:
                    if vector is None:
                        raise LoraClrError("The SDXL conditioning has no 'vector'.")
                    # clone(): outside inference mode this gives an ordinary tensor.
                    pooled.append(vector[:, : self._pooled_width()].detach().float().clone())
            else:
                context = cond
            contexts.append(context[:, :length].detach().float().clone())
        return Conditioning(
            context=torch.cat(contexts), pooled=torch.cat(pooled) if pooled else None
        )

    # -- denoising

    def _schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas, alphas_cumprod)``, both ``[1000]``: sigmas as the model stores them
        (passed back to it unchanged, so its sigma -> timestep lookup is exact) and the
        fp64 ``ᾱ_t = 1 / (1 + σ_t²)``."""
        sigmas = self._sigmas().detach()
        alphas = 1.0 / (1.0 + sigmas.to("cpu", torch.float64) ** 2)
        return sigmas, alphas

    def _adm_vector(self, cond: Conditioning, size: int) -> torch.Tensor:
        """SDXL ``y`` ``[B, adm]``: pooled text, then original = target size ``size`` and
        crop (0, 0), each as a sinusoidal embedding (as SDXL's conditioner builds it)."""
        if cond.pooled is None:
            raise InvalidInputError("SDXL conditioning needs the pooled text embedding.")
        pooled = cond.pooled.float().cpu()
        adm_in = int(self.unet.get_submodule("label_emb.0.0").weight.shape[1])
        dim = (adm_in - pooled.shape[1]) // SDXL_MICRO_CONDITIONS
        sizes = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)
        micro = sinusoid(sizes, dim).reshape(1, -1).expand(pooled.shape[0], -1)
        return torch.cat([pooled, micro], dim=1)

    def _raw_output(
        self, x_t: torch.Tensor, timestep: int, cond: Conditioning, size: int
    ) -> torch.Tensor:
        """The network's own output (ε or v) for DDPM-scaled latents ``x_t`` ``[B, 4, h, w]``
        at ``timestep``, through the host's sigma-space ``apply_model``.

        ``apply_model`` takes ``x = x_t / √ᾱ`` (k-diffusion scaling) and σ, and returns the
        denoised latents; ε = (x − x0) / σ, and for v-prediction
        v = (x / (σ² + 1) − x0) · √(σ² + 1) / σ.
        """
        sigmas, alphas = self._schedule()
        sigma = float(sigmas[timestep])
        x = (x_t.cpu().double() / math.sqrt(float(alphas[timestep]))).float().to(self.device)
        batch = x.shape[0]
        context = cond.context.to(self.device, self.dtype)
        kwargs: dict[str, Any] = {"c_crossattn": context, "transformer_options": {}}
        if self.architecture is Architecture.SDXL:
            kwargs["y"] = self._adm_vector(cond, size).to(self.device, self.dtype)
        sig = sigmas[timestep].reshape(1).expand(batch).to(self.device)
        denoised = self._apply_model(x, sig, **kwargs).cpu().double()  # fp64 on the CPU only
        xk = x.cpu().double()
        if self._v_prediction():
            return ((xk / (sigma**2 + 1) - denoised) * math.sqrt(sigma**2 + 1) / sigma).float()
        return ((xk - denoised) / sigma).float()

    def _apply_model(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.unet_patcher.model.apply_model(x, sigma, **kwargs)

    def predict_noise(
        self, latents: torch.Tensor, timestep: int, cond: Conditioning
    ) -> torch.Tensor:
        """One UNet evaluation; returns ε or v ``[B, 4, h, w]`` like the model predicts."""
        size = int(latents.shape[-1]) * 8
        return self._raw_output(latents, int(timestep), cond, size).to(self.device)

    def sample(
        self,
        cond: Conditioning,
        *,
        steps: int,
        size: int,
        seed: int,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """The shared recording run (:func:`ddim_sample`), the same as the A1111 host's."""
        return ddim_sample(
            lambda x, t: self._raw_output(x, t, cond, size),
            self._schedule()[1],
            cond.context.shape[0],
            steps=steps,
            size=size,
            seed=seed,
            v_prediction=self._v_prediction(),
            callback=callback,
        )

    # -- weight guard

    def _models(self) -> list[torch.nn.Module]:
        return [self.unet, *self.text.values()]

    def _patchers(self) -> list[Any]:
        """The clean patchers whose loading restores un-merged weights."""
        return [self.unet_patcher, self.clip.patcher]

    def _reload_after(self, previous: Any) -> list[Any]:
        """The patchers to load afterwards so the weights are as they were: for the UNet
        and for the text encoders, the loaded patcher of the same model, else the one the
        previous ``forge_objects`` would use."""
        loaded = [
            getattr(entry, "model", None)
            for entry in list(getattr(self.memory, "current_loaded_models", []))
        ]
        previous_clip = getattr(previous, "clip", None)
        fallbacks = [getattr(previous, "unet", None), getattr(previous_clip, "patcher", None)]
        chosen = []
        for clean, fallback in zip(self._patchers(), fallbacks, strict=True):
            same = [p for p in loaded if p is not None and getattr(p, "model", None) is clean.model]
            pick = same[0] if same else fallback
            if pick is not None and all(pick is not c for c in chosen):
                chosen.append(pick)
        return chosen

    @contextmanager
    def clean_weights(self) -> Iterator[None]:
        """Load the clean original patchers (restores LoRA-merged weights), point
        ``sd_model.forge_objects`` at a copy of them, run; then reload what was loaded and
        restore ``forge_objects`` (also on error). Raises if a weight ended up changed.

        One exception: weights already out of step with their loaded patcher (see
        :func:`out_of_step`) are left as that patcher defines them, which is what the
        host's next load would do anyway; they are checked to be in step instead."""
        models = self._models()
        before = [weights_fingerprint(m) for m in models]
        previous = self.sd_model.forge_objects
        reload = self._reload_after(previous)
        stale = [p for p in reload if out_of_step(p)]
        if stale:
            log.info(
                "%s: %d loaded patcher(s) did not match the weights (a LoRA of an earlier "
                "generation); they are re-applied after the merge",
                self.host_label,
                len(stale),
            )
        try:
            self.sd_model.forge_objects = self.original.shallow_copy()
            self.memory.load_models_gpu(self._patchers())
            yield
        finally:
            try:
                self.memory.load_models_gpu(reload)
            finally:
                self.sd_model.forge_objects = previous
            changed = [
                type(m).__name__
                for m in changed_weights(models, before)
                if not any(_inside(m, p.model) for p in stale)
            ]
            changed += [type(p.model).__name__ for p in stale if out_of_step(p)]
            if changed:
                raise LoraClrError(
                    f"Weights of {', '.join(changed)} changed during the merge; generate once "
                    f"or reload the checkpoint in {self.host_label} before trusting results."
                )


def out_of_step(patcher: Any) -> bool:
    """The model's weights carry another patch set than ``patcher`` defines.

    ldm_patched (reForge) records the applied set on the model
    (``current_weight_patches_uuid``); a real reForge was seen listing its clean CLIP
    patcher as loaded while the weights still held the previous generation's LoRA.
    Loading the patcher again fixes that, so its weights cannot be restored bit for bit.
    Patchers without that bookkeeping (new Forge) are never out of step here.
    """
    model = getattr(patcher, "model", None)
    if not hasattr(model, "current_weight_patches_uuid") or not hasattr(patcher, "patches_uuid"):
        return False
    return model.current_weight_patches_uuid != patcher.patches_uuid


def _inside(module: torch.nn.Module, root: Any) -> bool:
    return isinstance(root, torch.nn.Module) and any(m is module for m in root.modules())


class ForgeHost(PatcherHost):
    """New Forge (``backend/``): UNet ``forge_objects_original.unet.model.diffusion_model``,
    schedule and prediction type from ``unet.model.predictor``, compute dtype
    ``unet.model.computation_dtype`` (forge.md §2.2, §2.6)."""

    host_label = "Forge"

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
        return [_get(self.clip.tokenizer, key), getattr(engine, "tokenizer", None)]
