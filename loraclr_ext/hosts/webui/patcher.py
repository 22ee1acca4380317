"""What the Forge-family hosts share (new Forge and reForge): :class:`PatcherHost`.

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

:class:`PatcherHost` holds what Forge and reForge share; subclasses
(:class:`~loraclr_ext.hosts.webui.forge.ForgeHost`,
:class:`~loraclr_ext.hosts.webui.reforge.ReforgeHost`) say where each keeps the UNet, the
schedule, the dtypes and the tokenizer. Reading packed / fp8 storage is in
:mod:`~loraclr_ext.hosts.webui.storage`, the sigma-space arithmetic in
:mod:`~loraclr_ext.hosts.webui.sigma_space`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from loraclr_ext.errors import InvalidInputError, LoraClrError
from loraclr_ext.hosts.base import Conditioning, StepCallback, Tokens, in_batches, iter_chunks
from loraclr_ext.hosts.ddim import ddim_sample
from loraclr_ext.hosts.text_paths import has_text_model_level, live_text_path
from loraclr_ext.hosts.webui.detect import forge_architecture
from loraclr_ext.hosts.webui.sigma_space import (
    SDXL_POOLED,
    alphas_from_sigmas,
    k_diffusion_input,
    network_output,
    sdxl_adm,
)
from loraclr_ext.hosts.webui.storage import check_storage, float_weight
from loraclr_ext.hosts.weights import changed_weights, plain_copy, weight_of, weights_fingerprint
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


def get_item(container: Any, key: str) -> Any:
    """``container.key`` or ``container[key]`` (ModuleDict, ObjectDict or plain object)."""
    value = getattr(container, key, None)
    if value is None and hasattr(container, "__getitem__"):
        try:
            value = container[key]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


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

    def host_mode(self) -> AbstractContextManager[Any]:
        """The grad mode the WebUI's own generation runs its model code in: the merge runs
        the host's conditioning and UNet calls in it, so the host's code meets its tensors
        exactly as in a generation. Plain ``no_grad`` here (reForge, the A1111 front end)."""
        return torch.no_grad()

    def __init__(self, sd_model: Any, memory: Any, networks: Any = None) -> None:
        self.architecture = forge_architecture(sd_model)
        self.sd_model = sd_model
        self.memory = memory
        self.networks = networks
        self.max_batch: int | None = None
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
            wrapper = get_item(encoders, key)
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
        length = self.chunk_length
        contexts: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        for chunk in iter_chunks(list(prompts), ENCODE_CHUNK):
            # The host's own call in the host's own grad mode (Forge: inference mode).
            # Its text engine recasts modules as it goes; done outside inference mode on
            # inference parameters that leaves them unusable for every later generation
            # (seen in a real Forge). The merge's hooks leave inference mode themselves.
            with self.host_mode():
                cond = self.sd_model.get_learned_conditioning(chunk)
            if isinstance(cond, dict):
                context = cond["crossattn"]
                vector = cond.get("vector")
                if self.architecture is Architecture.SDXL:
                    if vector is None:
                        raise LoraClrError("The SDXL conditioning has no 'vector'.")
                    pooled.append(plain_copy(vector[:, : self._pooled_width()]).float())
            else:
                context = cond
            contexts.append(plain_copy(context[:, :length]).float())
        return Conditioning(
            context=torch.cat(contexts), pooled=torch.cat(pooled) if pooled else None
        )

    # -- denoising

    def _schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas, alphas_cumprod)``, both ``[1000]``: sigmas as the model stores them
        (passed back to it unchanged, so its sigma -> timestep lookup is exact) and the
        fp64 ``ᾱ_t = 1 / (1 + σ_t²)``."""
        sigmas = self._sigmas().detach()
        return sigmas, alphas_from_sigmas(sigmas)

    def _adm_vector(self, cond: Conditioning, size: int) -> torch.Tensor:
        """SDXL ``y`` ``[B, adm]`` for this UNet (:func:`sdxl_adm`)."""
        if cond.pooled is None:
            raise InvalidInputError("SDXL conditioning needs the pooled text embedding.")
        adm_in = int(weight_of(self.unet.get_submodule("label_emb.0.0")).shape[1])
        return sdxl_adm(cond.pooled, adm_in, size)

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
        x = k_diffusion_input(x_t, float(alphas[timestep])).to(self.device)
        batch = x.shape[0]
        context = cond.context.to(self.device, self.dtype)
        kwargs: dict[str, Any] = {"c_crossattn": context, "transformer_options": {}}
        if self.architecture is Architecture.SDXL:
            kwargs["y"] = self._adm_vector(cond, size).to(self.device, self.dtype)
        sig = sigmas[timestep].reshape(1).expand(batch).to(self.device)
        with self.host_mode():
            denoised = self._apply_model(x, sig, **kwargs)
        denoised = plain_copy(denoised).cpu().double()  # fp64 on the CPU: MPS has none
        return network_output(x.cpu().double(), denoised, sigma, self._v_prediction())

    def _apply_model(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.unet_patcher.model.apply_model(x, sigma, **kwargs)

    def predict_noise(
        self, latents: torch.Tensor, timestep: int, cond: Conditioning
    ) -> torch.Tensor:
        """One UNet evaluation; returns ε or v ``[B, 4, h, w]`` like the model predicts."""
        size = int(latents.shape[-1]) * 8
        out = in_batches(
            lambda x, c: self._raw_output(x, int(timestep), c, size), latents, cond, self.max_batch
        )
        return out.to(self.device)

    def sample(
        self,
        cond: Conditioning,
        *,
        steps: int,
        size: int,
        seed: int,
        callback: StepCallback | None = None,
        noise_period: int | None = None,
    ) -> torch.Tensor:
        """The shared recording run (:func:`ddim_sample`), the same as the A1111 host's."""
        return ddim_sample(
            lambda x, t: in_batches(
                lambda xb, c: self._raw_output(xb, t, c, size), x, cond, self.max_batch
            ),
            self._schedule()[1],
            cond.context.shape[0],
            steps=steps,
            size=size,
            seed=seed,
            v_prediction=self._v_prediction(),
            callback=callback,
            noise_period=noise_period,
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
        previous ``forge_objects`` would use.

        In the order that gives the memory manager's list (most recently loaded first) its
        order from before: what was loaded earlier is loaded again first."""
        loaded = [
            getattr(entry, "model", None)
            for entry in list(getattr(self.memory, "current_loaded_models", []))
        ]
        previous_clip = getattr(previous, "clip", None)
        fallbacks = [getattr(previous, "unet", None), getattr(previous_clip, "patcher", None)]
        chosen: list[Any] = []
        for clean, fallback in zip(self._patchers(), fallbacks, strict=True):
            same = [p for p in loaded if p is not None and getattr(p, "model", None) is clean.model]
            pick = same[0] if same else fallback
            if pick is not None and all(pick is not c for c in chosen):
                chosen.append(pick)

        def age(patcher: Any) -> int:
            return next((i for i, p in enumerate(loaded) if p is patcher), len(loaded))

        return sorted(chosen, key=age, reverse=True)

    def _loaded_patchers(self) -> list[Any]:
        """The patchers the memory manager holds as loaded, most recent first."""
        entries = list(getattr(self.memory, "current_loaded_models", []))
        return [getattr(entry, "model", None) for entry in entries]

    def _unload_new(self, held: list[Any], devices: dict[int, torch.device | None]) -> None:
        """Unload, through the memory manager's own ``LoadedModel.model_unload``, every
        patcher loaded now that was not loaded before the merge. A real Forge merged
        before its first generation (nothing loaded) kept the clean patchers loaded.
        A model found on another device than now goes back to the patcher's offload
        device (Forge's plain unload); one found where it is stays there."""
        loaded = getattr(self.memory, "current_loaded_models", None)
        if not isinstance(loaded, list):
            return
        for index in range(len(loaded) - 1, -1, -1):
            patcher = getattr(loaded[index], "model", None)
            if any(patcher is p for p in held):
                continue
            entry = loaded.pop(index)
            moved = devices.get(id(patcher)) not in (None, _model_device(patcher))
            _model_unload(entry, keep_device=not moved)

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
        held = self._loaded_patchers()
        devices = {id(p): _model_device(p) for p in self._patchers()}
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
            with self.host_mode():
                self.memory.load_models_gpu(self._patchers())
            yield
        finally:
            try:
                with self.host_mode():
                    self.memory.load_models_gpu(reload)
                    self._unload_new(held, devices)
            finally:
                self.sd_model.forge_objects = previous
            changed = [
                type(m).__name__
                for m in changed_weights(models, before)
                if not any(_inside(m, p.model) for p in stale)
            ]
            # A patcher unloaded again (not loaded before the merge) defines no weights.
            still = self._loaded_patchers()
            changed += [
                type(p.model).__name__
                for p in stale
                if out_of_step(p) and any(p is q for q in still)
            ]
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
    if (
        model is None
        or not hasattr(model, "current_weight_patches_uuid")
        or not hasattr(patcher, "patches_uuid")
    ):
        return False
    return model.current_weight_patches_uuid != patcher.patches_uuid


def _model_device(patcher: Any) -> torch.device | None:
    """Where a patcher's model keeps its first parameter (``None``: no parameters)."""
    model = getattr(patcher, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    first = next(model.parameters(), None)
    return None if first is None else first.device


def _model_unload(entry: Any, *, keep_device: bool) -> None:
    """``entry.model_unload`` as each WebUI spells it: new Forge
    ``model_unload(avoid_model_moving=False)``, reForge's ldm_patched
    ``model_unload(memory_to_free=None, unpatch_weights=True)``."""
    unload = getattr(entry, "model_unload", None)
    if not callable(unload):
        return
    try:
        parameters = inspect.signature(unload).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    if "avoid_model_moving" in parameters:
        unload(avoid_model_moving=keep_device)
    else:
        unload()


def _inside(module: torch.nn.Module, root: Any) -> bool:
    return isinstance(root, torch.nn.Module) and any(m is module for m in root.modules())
