"""The standalone host: a diffusers SD1 / SD2 / SDXL pipeline behind the Host protocol.

Used by the command line, the demo, the benchmarks and the tests. It never merges a LoRA
into its weights, so :meth:`StandaloneHost.clean_weights` is a guard that proves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from loraclr_ext.errors import InvalidInputError, LoraClrError, ModelNotFoundError
from loraclr_ext.hosts import model_files
from loraclr_ext.hosts.base import (
    Conditioning,
    StepCallback,
    Tokens,
    in_batches,
    iter_chunks,
    seeded_noise,
)
from loraclr_ext.hosts.devices import resolve_device, resolve_dtype
from loraclr_ext.hosts.text_paths import canonical_text_path, has_text_model_level, live_text_path
from loraclr_ext.hosts.weights import changed_weights, weight_of, weights_fingerprint
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.targets import Component, ModuleRef

ENCODE_CHUNK = 32
_TARGET_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


# ------------------------------------------------------------------------- architecture


def pipeline_architecture(pipe: Any, override: Architecture | str | None = None) -> Architecture:
    """SDXL when there is a second text encoder or ``text_time`` conditioning; else SD2 for a
    1024-wide context, SD1 for 768; tiny models (other widths) are SD1 unless ``override``.

    Raises:
        InvalidInputError: ``override`` contradicts the model's structure.
    """
    unet_cfg = pipe.unet.config
    is_xl = (
        getattr(pipe, "text_encoder_2", None) is not None
        or unet_cfg.get("addition_embed_type") == "text_time"
    )
    if override is not None:
        arch = Architecture(override)
        if (arch is Architecture.SDXL) != is_xl:
            raise InvalidInputError(
                f"Architecture {arch.label} was requested but the model "
                f"{'is' if is_xl else 'is not'} an SDXL model (two text encoders)."
            )
        return arch
    if is_xl:
        return Architecture.SDXL
    return Architecture.SD2 if unet_cfg.cross_attention_dim == 1024 else Architecture.SD1


# ------------------------------------------------------------------------------- the host


class StandaloneHost:
    """A diffusers pipeline as a merge host (see :class:`loraclr_ext.hosts.base.Host`).

    Attributes:
        pipe: the ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (VAE may be None).
        architecture, device, dtype: as in the protocol.
    """

    def __init__(self, pipe: Any, architecture: Architecture, device: torch.device) -> None:
        self.pipe = pipe
        self.architecture = architecture
        self.device = device
        self.dtype: torch.dtype = pipe.unet.dtype
        self.max_batch: int | None = None
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    # -- construction

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        device: str | torch.device = "auto",
        *,
        dtype: torch.dtype | str | None = None,
        architecture: Architecture | str | None = None,
    ) -> StandaloneHost:
        """Wrap an already built pipeline, moving it to ``device`` (and ``dtype`` if given)."""
        dev = resolve_device(device)
        arch = pipeline_architecture(pipe, architecture)
        for model in _models(pipe):
            if dtype is None:
                model.to(device=dev)
            else:
                model.to(device=dev, dtype=resolve_dtype(dtype, dev))
            model.eval()
        return cls(pipe, arch, dev)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        dtype: torch.dtype | str | None = None,
        *,
        architecture: Architecture | str | None = None,
        tokenizer: str | Path | None = None,
        config: str | Path | None = None,
    ) -> StandaloneHost:
        """Load a diffusers folder or an ldm ``.safetensors`` checkpoint, offline.

        Args:
            path: model folder or single-file checkpoint.
            tokenizer: folder with ``vocab.json`` + ``merges.txt`` (or a model folder with
                ``tokenizer/``); searched before the model folder and the HF cache.
            config: diffusers folder whose configs describe a single-file checkpoint
                (default: the shipped SD1.5 / SD2.1 / SDXL-base configs).

        Raises:
            ModelNotFoundError: path, tokenizer files or configs are missing.
            InvalidInputError: bad device/dtype, or an unsupported file type.
        """
        path = Path(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        search = [Path(tokenizer)] if tokenizer is not None else []
        if path.is_dir():
            sdxl = model_files.folder_is_sdxl(path)
            folder_arch = Architecture.SDXL if sdxl else Architecture(architecture or "sd1")
            toks = model_files.load_tokenizers(folder_arch, [*search, path])
            pipe = model_files.load_folder_pipeline(path, dt, toks, sdxl)
        elif path.is_file():
            pipe = _load_single_file(path, dt, search, architecture, config)
        else:
            raise ModelNotFoundError(f"Model '{path}' does not exist.")
        return cls.from_pipeline(pipe, dev, architecture=architecture)

    # -- modules

    def _component_model(self, component: Component) -> torch.nn.Module | None:
        name = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}[component]
        return getattr(self.pipe, name, None)

    def modules(self, refs: Iterable[ModuleRef]) -> dict[ModuleRef, torch.nn.Module]:
        """Live modules for ``refs``; refs the model lacks are left out."""
        models = {c: self._component_model(c) for c in ("unet", "te1", "te2")}
        return resolve_modules(models, refs)

    def all_refs(self) -> list[ModuleRef]:
        """Canonical refs of every Linear / Conv2d in the UNet and text encoder(s)."""
        refs: list[ModuleRef] = []
        for component in ("te1", "te2", "unet"):
            model = self._component_model(component)
            if model is None:
                continue
            level = component == "unet" or has_text_model_level(model)
            for name, module in model.named_modules():
                if isinstance(module, _TARGET_TYPES):
                    path = name if component == "unet" else canonical_text_path(name, level)
                    refs.append(ModuleRef(component, path))
        return refs

    def base_weight(self, ref: ModuleRef) -> torch.Tensor:
        """CPU fp32 copy of the weight, ``[out, in·kh·kw]``.

        Raises:
            InvalidInputError: the model has no such module.
        """
        found = self.modules([ref])
        if ref not in found:
            raise InvalidInputError(f"The {self.architecture.label} model has no module {ref}.")
        module = found[ref]
        # A PEFT-wrapped layer keeps the original weight in ``base_layer``.
        weight = weight_of(getattr(module, "base_layer", module))
        return weight.detach().to("cpu", torch.float32).reshape(weight.shape[0], -1).clone()

    # -- text

    def tokenize(self, prompts: list[str]) -> Tokens:
        """Ids with BOS/EOS, truncated to 77 like the pipeline does, unpadded."""
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding=False, truncation=True, max_length=tok.model_max_length)
        return Tokens(ids=[list(map(int, x)) for x in ids.input_ids], length=tok.model_max_length)

    # encode and predict_noise follow the caller's grad mode: the engine runs them under
    # no_grad, the demo's concept fitter trains LoRA factors through them.
    def encode(self, prompts: list[str]) -> Conditioning:
        """The pipeline's own ``encode_prompt`` (no CFG, clip skip none).

        SD1/SD2: context ``[B, 77, ctx]`` = the encoder's last hidden state (diffusers' SD2
        encoder already stops one layer early). SDXL: context ``[B, 77, h1 + h2]`` = both
        encoders' penultimate hidden states concatenated (first encoder first), pooled
        ``[B, proj]`` = the second encoder's projected pooled output.
        """
        if not prompts:
            raise InvalidInputError("No prompts to encode.")
        contexts: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        for chunk in iter_chunks(list(prompts), ENCODE_CHUNK):
            if self.architecture is Architecture.SDXL:
                ctx, _, pool, _ = self.pipe.encode_prompt(
                    prompt=chunk,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                )
                pooled.append(pool)
            else:
                ctx, _ = self.pipe.encode_prompt(
                    chunk, self.device, 1, do_classifier_free_guidance=False
                )
            contexts.append(ctx)
        return Conditioning(
            context=torch.cat(contexts), pooled=torch.cat(pooled) if pooled else None
        )

    # -- denoising

    def _unet_kwargs(self, cond: Conditioning, size: int) -> dict[str, Any]:
        """Cross-attention input and, for SDXL, ``text_time`` micro-conditioning for
        original size = target size = ``size`` and crop (0, 0)."""
        context = cond.context.to(self.device, self.dtype)
        kwargs: dict[str, Any] = {"encoder_hidden_states": context}
        if self.architecture is Architecture.SDXL:
            if cond.pooled is None:
                raise InvalidInputError("SDXL conditioning needs the pooled text embedding.")
            batch = context.shape[0]
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=self.dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled.to(self.device, self.dtype),
                "time_ids": time_ids.to(self.device).expand(batch, -1),
            }
        return kwargs

    def _fresh_scheduler(self) -> Any:
        """A new scheduler from the pipeline's config, so runs never share state.

        PNDM (SD1.5's default) is replaced by DDIM with the same noise schedule: its PLMS
        warm-up calls the UNet ``steps + 1`` times, and collection wants exactly ``steps``.
        """
        from diffusers import DDIMScheduler, PNDMScheduler

        sched = self.pipe.scheduler
        cls = DDIMScheduler if isinstance(sched, PNDMScheduler) else type(sched)
        return cls.from_config(sched.config)

    @torch.no_grad()
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
        """Seeded denoising without CFG: ``steps`` UNet calls, ``callback(i, steps)`` after
        step ``i`` (0-based). Noise is :func:`seeded_noise` (from a CPU generator, so
        identical on every device; ``noise_period``: see there). Returns latents
        ``[B, 4, size/8, size/8]`` in the host dtype."""
        if steps < 1:
            raise InvalidInputError(f"steps must be at least 1, got {steps}.")
        if size < 8 or size % 8:
            raise InvalidInputError(f"size must be a positive multiple of 8, got {size}.")
        batch = cond.context.shape[0]
        channels = int(self.pipe.unet.config.in_channels)
        noise = seeded_noise(batch, channels, size // 8, seed, noise_period)
        sched = self._fresh_scheduler()
        sched.set_timesteps(steps, device=self.device)
        latents = (noise * sched.init_noise_sigma).to(self.device, self.dtype)
        for i, t in enumerate(sched.timesteps):
            model_in = sched.scale_model_input(latents, t)
            out = self._unet(model_in, t, cond, size)
            latents = sched.step(out, t, latents, return_dict=False)[0].to(self.dtype)
            if callback is not None:
                callback(i, steps)
        return latents

    def predict_noise(
        self, latents: torch.Tensor, timestep: int, cond: Conditioning
    ) -> torch.Tensor:
        """One UNet call on ``latents`` ``[B, 4, h, w]``; returns ε or v ``[B, 4, h, w]``."""
        size = int(latents.shape[-1]) * 8
        t = torch.tensor(timestep, device=self.device)
        return self._unet(latents.to(self.device, self.dtype), t, cond, size)

    def _unet(
        self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, size: int
    ) -> torch.Tensor:
        """The UNet on ``latents``, at most :attr:`max_batch` of them per call."""

        def call(x: torch.Tensor, c: Conditioning) -> torch.Tensor:
            return self.pipe.unet(x, t, return_dict=False, **self._unet_kwargs(c, size))[0]

        return in_batches(call, latents, cond, self.max_batch)

    # -- weight guard

    @contextmanager
    def clean_weights(self) -> Iterator[None]:
        """Run with PEFT adapters (if any) disabled and prove on exit that no weight of the
        UNet or text encoders changed.

        Raises:
            InvalidInputError: LoRAs are fused into the weights (call ``unfuse_lora`` first).
            LoraClrError: a weight changed inside the context.
        """
        if getattr(self.pipe, "num_fused_loras", 0):
            raise InvalidInputError(
                "LoRAs are fused into this pipeline's weights; call pipe.unfuse_lora() first."
            )
        models = _models(self.pipe)
        before = [weights_fingerprint(m) for m in models]
        # A model with a ``peft_config`` is a diffusers/transformers PEFT mixin model, which
        # defines both methods; the cast only tells the checker so.
        peft = [cast(_PeftModel, m) for m in models if getattr(m, "peft_config", None)]
        for m in peft:
            m.disable_adapters()
        try:
            yield
        finally:
            for m in peft:
                m.enable_adapters()
            changed = [type(m).__name__ for m in changed_weights(models, before)]
            if changed:
                raise LoraClrError(
                    f"Base weights of {', '.join(changed)} changed during the merge; the "
                    "standalone host never writes weights, so something else did."
                )


# ------------------------------------------------------------------------------ helpers


class _PeftModel(Protocol):
    """The part of diffusers' ``PeftAdapterMixin`` this host calls."""

    def disable_adapters(self) -> None: ...

    def enable_adapters(self) -> None: ...


def _models(pipe: Any) -> list[torch.nn.Module]:
    """The UNet and text encoder(s) of ``pipe`` (the VAE is never used)."""
    names = ("unet", "text_encoder", "text_encoder_2")
    return [m for n in names if isinstance(m := getattr(pipe, n, None), torch.nn.Module)]


def resolve_modules(
    models: dict[str, torch.nn.Module | None], refs: Iterable[ModuleRef]
) -> dict[ModuleRef, torch.nn.Module]:
    """Map canonical refs to modules of ``models`` (keys ``unet``/``te1``/``te2``), whichever
    transformers naming the text encoders use; refs without a module are left out."""
    found: dict[ModuleRef, torch.nn.Module] = {}
    levels = {c: has_text_model_level(m) for c, m in models.items() if m is not None}
    for ref in refs:
        model = models.get(ref.component)
        if model is None:
            continue
        path = (
            ref.path if ref.component == "unet" else live_text_path(ref.path, levels[ref.component])
        )
        try:
            found[ref] = model.get_submodule(path)
        except AttributeError:
            continue
    return found


def _load_single_file(
    path: Path,
    dtype: torch.dtype,
    search: list[Path],
    architecture: Architecture | str | None,
    config: str | Path | None,
) -> Any:
    if path.suffix.lower() != ".safetensors":
        raise InvalidInputError(
            f"'{path.name}' is not a .safetensors file; pickled checkpoints (.ckpt/.pt) are "
            "refused because loading them can run code. Convert it to safetensors first."
        )
    arch = model_files.checkpoint_architecture(path)
    if architecture is not None and Architecture(architecture) is not arch:
        raise InvalidInputError(
            f"'{path.name}' is an {arch.label} checkpoint, not {Architecture(architecture).label}."
        )
    config_dir = Path(config) if config is not None else model_files.builtin_config(arch)
    toks = model_files.load_tokenizers(arch, [*search, config_dir, path.parent])
    pipe = model_files.load_single_file_pipeline(path, arch, config_dir, dtype, toks)
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m]
    model_files.verify_text_encoders(path, arch, encoders)
    return pipe
