"""The AUTOMATIC1111 1.10 loaded checkpoint (``shared.sd_model``) behind the Host protocol.

SD 1.x, SD 2.x and SDXL (dossier §3.1–3.3). The UNet is ``sd_model.model.diffusion_model``
with ldm / sgm names. Text encoders:

* SD 1.x: the HF CLIP at ``cond_stage_model.wrapped.transformer``;
* SD 2.x: the open_clip model at ``cond_stage_model.wrapped.model``; its attention layers
  are ``torch.nn.MultiheadAttention`` with fused q/k/v, made hookable for the duration of
  :meth:`A1111Host.encode` by :mod:`loraclr_ext.hosts.webui.fused_attention`. The WebUI stops at
  the penultimate resblock, so the last one is not offered as a target (diffusers drops it
  too);
* SDXL: ``conditioner.embedders[0].wrapped.transformer`` (CLIP-L, HF, ``te1``) and
  ``conditioner.embedders[1].wrapped.model`` (OpenCLIP-bigG, open_clip, ``te2``).

Text goes through ``sd_model.get_learned_conditioning`` (the path generation takes: clip
skip, emphasis), denoising through ``sd_model.apply_model(x, t, cond)`` with DDPM timesteps
and the model's own ``alphas_cumprod`` / ``parameterization``. For SDXL the conditioning is
the sgm dict: :class:`Conditioning` ``context`` holds ``crossattn`` ``[B, 77, 2048]`` and
``pooled`` holds the whole sgm ``vector`` ``[B, 2816]`` (pooled bigG output and the size
embeddings the WebUI computed, 1024² unless it says otherwise), which the engine only
slices by batch and hands back to :meth:`A1111Host.predict_noise`.

LoRAs the built-in Lora extension merged into the weights (``in_proj_weight`` /
``out_proj.weight`` for an MHA) are taken out before the merge and put back afterwards, so
the model ends exactly as it was (dossier §4.6). Under ``--medvram`` / ``--lowvram``
weights may sit on the CPU between calls: nothing here moves a model or submodule (the
WebUI's own hooks do when ``get_learned_conditioning`` / ``apply_model`` run), only small
tensors (latents, conditioning) are sent to ``devices.device``, and :meth:`base_weight`
copies one weight to the CPU wherever it is.

SD3, SSD-1B, the SDXL refiner and inpainting checkpoints are refused with a clear message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from loraclr_ext.errors import InvalidInputError, LoraClrError, NoModelError
from loraclr_ext.hosts.base import Conditioning, StepCallback, Tokens, in_batches, iter_chunks
from loraclr_ext.hosts.ddim import ddim_sample
from loraclr_ext.hosts.text_paths import has_text_model_level, live_text_path
from loraclr_ext.hosts.webui.fused_attention import (
    AttentionProjections,
    batch_first_calls,
    explicit_attention,
    projections,
)
from loraclr_ext.hosts.weights import (
    changed_weights,
    readable,
    to_cpu_float,
    weight_of,
    weights_fingerprint,
    write_into,
)
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.naming import ldm_unet_path
from loraclr_ext.model.targets import Component, ModuleRef

ENCODE_CHUNK = 16
CHUNK_TOKENS = 75
"""Prompt tokens per 77-token CLIP chunk (BOS and EOS around them)."""
_TEXT_PATH = re.compile(
    r"text_model\.encoder\.layers\.(\d+)\.(?:self_attn\.(q|k|v|out)_proj|mlp\.(fc1|fc2))"
)
_OPEN_CLIP_MLP = {"fc1": "c_fc", "fc2": "c_proj"}


def a1111_architecture(sd_model: Any) -> Architecture:
    """The family of an A1111 model from its ``is_*`` flags (dossier §3.1).

    Raises:
        NoModelError: no model.
        InvalidInputError: SD3, SSD-1B or an inpainting / instruct (``c_concat``) model.
    """
    if sd_model is None:
        raise NoModelError()
    if getattr(sd_model, "is_sd3", False) or getattr(sd_model, "is_ssd", False):
        raise InvalidInputError(
            "The loaded checkpoint (SD3 / SSD-1B) is not supported; load an SD 1.x, SD 2.x "
            "or SDXL base checkpoint to merge."
        )
    inpaint = getattr(sd_model, "is_sdxl_inpaint", False) or (
        getattr(getattr(sd_model, "model", None), "conditioning_key", None) == "hybrid"
    )
    if inpaint:
        raise InvalidInputError(
            "The loaded checkpoint is an inpainting / instruct model (extra image input); "
            "load the base checkpoint the LoRAs were trained on to merge."
        )
    if getattr(sd_model, "is_sdxl", False):
        return Architecture.SDXL
    if getattr(sd_model, "is_sd2", False):
        return Architecture.SD2
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


@dataclass
class TextEncoder:
    """One text encoder of the loaded model.

    Attributes:
        component: ``te1`` / ``te2``.
        model: an HF ``CLIPTextModel`` or an open_clip model (``transformer.resblocks``).
        open_clip: which of the two.
        layers: resblocks that run when the WebUI encodes (open_clip only; SD 2.x stops at
            the penultimate one); refs of later layers are left out.
    """

    component: Component
    model: torch.nn.Module
    open_clip: bool = False
    layers: int | None = None


def text_encoders(sd_model: Any, arch: Architecture) -> list[TextEncoder]:
    """The text encoders of an A1111 model of family ``arch``.

    Raises:
        InvalidInputError: the layout is not the one of an SD 1.x / SD 2.x / SDXL base model
            (e.g. the SDXL refiner, which has only OpenCLIP-bigG).
    """
    try:
        if arch is Architecture.SDXL:
            embedders = sd_model.conditioner.embedders
            clip_l = embedders[0].wrapped.transformer
            big_g = embedders[1].wrapped.model
            return [
                TextEncoder("te1", clip_l),
                TextEncoder("te2", big_g, True, len(big_g.transformer.resblocks)),
            ]
        wrapped = sd_model.cond_stage_model.wrapped
        if arch is Architecture.SD2:
            model = wrapped.model
            stop = int(getattr(wrapped, "layer_idx", 0) or 0)
            return [TextEncoder("te1", model, True, len(model.transformer.resblocks) - stop)]
        return [TextEncoder("te1", wrapped.transformer)]
    except (AttributeError, IndexError, TypeError):
        raise InvalidInputError(
            f"The loaded {arch.label} checkpoint does not have the text encoders of an "
            f"{arch.label} base model (an SDXL refiner?); load a base checkpoint to merge."
        ) from None


class A1111Host:
    """The WebUI's loaded SD 1.x / SD 2.x / SDXL model as a merge host.

    Args:
        sd_model: ``modules.sd_models.model_data.sd_model``.
        devices: ``modules.devices`` (``device``, ``autocast``).
        networks: the built-in Lora extension's ``networks`` module, or ``None``.

    Raises:
        NoModelError, InvalidInputError: see :func:`a1111_architecture`, :func:`text_encoders`.
    """

    def __init__(self, sd_model: Any, devices: Any, networks: Any = None) -> None:
        self.architecture = a1111_architecture(sd_model)
        self.sd_model = sd_model
        self.devices = devices
        self.networks = networks
        self.max_batch: int | None = None
        self.unet: torch.nn.Module = sd_model.model.diffusion_model
        self.text_encoders = text_encoders(sd_model, self.architecture)
        # The WebUI wrapper whose tokenize() / id_start / id_end line up with the conditioning.
        self.text_wrapper = (
            sd_model.conditioner.embedders[0]
            if self.architecture is Architecture.SDXL
            else sd_model.cond_stage_model
        )
        self.device = torch.device(getattr(devices, "device", "cpu"))
        self.dtype = next(self.unet.parameters()).dtype
        self._projections: dict[torch.nn.MultiheadAttention, AttentionProjections] = {}
        # open_clip MLPs handed out by modules() that run sequence first ([T, B, C]).
        self._sequence_first: dict[torch.nn.Module, None] = {}

    # -- modules

    def modules(self, refs: Iterable[ModuleRef]) -> dict[ModuleRef, torch.nn.Module]:
        """Live modules for ``refs`` (UNet via ldm names); missing ones are left out.

        open_clip attention refs resolve to :class:`~loraclr_ext.hosts.webui.fused_attention.
        FusedProjection` proxies (q/k/v) and the real ``out_proj``, whose forward hooks fire
        inside :meth:`encode` only; MLP refs resolve to ``mlp.c_fc`` / ``mlp.c_proj``, which
        inside :meth:`encode` see batch-first ``[B, T, C]`` inputs like every other text
        module (open_clip 2.x runs sequence first).

        Raises:
            InvalidInputError: an attention layer of a layout open_clip does not use.
        """
        encoders = {e.component: e for e in self.text_encoders}
        levels = {e.component: has_text_model_level(e.model) for e in encoders.values()}
        found: dict[ModuleRef, torch.nn.Module] = {}
        for ref in refs:
            enc = encoders.get(ref.component)
            if enc is not None and enc.open_clip:
                # Raises on an MHA it cannot hook instead of dropping the layer silently.
                module = self._open_clip_module(enc, ref.path)
                if module is not None:
                    found[ref] = module
                continue
            try:
                if ref.component == "unet":
                    found[ref] = self.unet.get_submodule(ldm_unet_path(ref.path, self.architecture))
                elif enc is not None:
                    path = live_text_path(ref.path, levels[ref.component])
                    found[ref] = enc.model.get_submodule(path)
            except (AttributeError, InvalidInputError):
                continue
        return found

    def _open_clip_module(self, enc: TextEncoder, path: str) -> torch.nn.Module | None:
        """Canonical ``text_model.encoder.layers.N.…`` path -> the open_clip module."""
        match = _TEXT_PATH.fullmatch(path)
        if match is None:
            return None
        index, attn, mlp = int(match[1]), match[2], match[3]
        blocks = enc.model.get_submodule("transformer.resblocks")
        if not isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)):
            return None
        if index >= min(len(blocks), enc.layers if enc.layers is not None else len(blocks)):
            return None
        block = blocks[index]
        attn_module = getattr(block, "attn", None)
        mlp_module = getattr(block, "mlp", None)
        if not isinstance(attn_module, torch.nn.Module) or not isinstance(
            mlp_module, torch.nn.Module
        ):
            return None
        if mlp is not None:
            if not getattr(attn_module, "batch_first", False):
                self._sequence_first[mlp_module] = None
            return getattr(mlp_module, _OPEN_CLIP_MLP[mlp])
        return self._attention(attn_module).by_name(attn)

    def _attention(self, mha: torch.nn.Module) -> AttentionProjections:
        """The cached hookable projections of one MHA (the same objects on every call, so
        hooks the engine registers stay attached)."""
        if not isinstance(mha, torch.nn.MultiheadAttention):
            raise InvalidInputError(
                "The loaded text encoder has an attention layer this merge cannot hook "
                f"({type(mha).__name__} is not a torch MultiheadAttention)"
            )
        if mha not in self._projections:
            try:
                self._projections[mha] = projections(mha)
            except ValueError as exc:
                raise InvalidInputError(
                    f"The loaded text encoder has an attention layer this merge cannot hook ({exc})"
                ) from None
        return self._projections[mha]

    def _attention_pairs(self) -> list[tuple[torch.nn.MultiheadAttention, AttentionProjections]]:
        """The MHAs whose projections :meth:`modules` handed out; only these need to run
        through them (the others keep the library's own forward)."""
        return list(self._projections.items())

    def base_weight(self, ref: ModuleRef) -> torch.Tensor:
        """CPU fp32 copy ``[out, in·kh·kw]`` (works for fp8 storage, for lowvram weights on
        the CPU, and for the ``[C, C]`` slice of a fused ``in_proj_weight``)."""
        found = self.modules([ref])
        if ref not in found:
            raise InvalidInputError(f"The loaded model has no module {ref}.")
        weight = weight_of(found[ref])
        return to_cpu_float(weight).reshape(weight.shape[0], -1)

    # -- text

    def tokenize(self, prompts: list[str]) -> Tokens:
        """Ids the way the WebUI wrapper lays out the first chunk: ``id_start``, up to 75
        prompt tokens, ``id_end`` (SDXL: CLIP-L's wrapper; bigG's ids are the same words)."""
        wrapper = self.text_wrapper
        if not all(hasattr(wrapper, a) for a in ("tokenize", "id_start", "id_end")):
            return self._hf_tokenize(prompts)
        start, end = int(wrapper.id_start), int(wrapper.id_end)
        ids = [
            [start, *map(int, row[:CHUNK_TOKENS]), end] for row in wrapper.tokenize(list(prompts))
        ]
        return Tokens(ids=ids, length=CHUNK_TOKENS + 2)

    def _hf_tokenize(self, prompts: list[str]) -> Tokens:
        """Fallback for wrappers without ``tokenize``: the HF CLIP tokenizer (SD 1.x)."""
        tok = self.text_wrapper.wrapped.tokenizer
        ids = tok(prompts, padding=False, truncation=True, max_length=CHUNK_TOKENS + 2)
        return Tokens(ids=[list(map(int, x)) for x in ids.input_ids], length=CHUNK_TOKENS + 2)

    def encode(self, prompts: list[str]) -> Conditioning:
        """``sd_model.get_learned_conditioning``; only the first 77 tokens are kept.

        Returns context ``[B, 77, C]`` (SDXL: ``crossattn``) and, for SDXL, the sgm
        ``vector`` ``[B, 2816]`` as ``pooled``. Every open_clip attention layer :meth:`modules`
        handed out runs through its hookable projections (and its MLP batch first) while
        this runs, and only then. No module is moved: under medvram / lowvram the WebUI's
        own hooks bring the text encoder to the GPU.
        """
        if not prompts:
            raise InvalidInputError("No prompts to encode.")
        contexts: list[torch.Tensor] = []
        vectors: list[torch.Tensor] = []
        length = CHUNK_TOKENS + 2
        with (
            self.devices.autocast(),
            explicit_attention(self._attention_pairs()),
            batch_first_calls(list(self._sequence_first)),
        ):
            for chunk in iter_chunks(list(prompts), ENCODE_CHUNK):
                cond = self.sd_model.get_learned_conditioning(chunk)
                if isinstance(cond, dict):
                    vectors.append(cond["vector"].float())
                    cond = cond["crossattn"]
                contexts.append(cond[:, :length].float())
        if self.architecture is Architecture.SDXL and len(vectors) != len(contexts):
            raise InvalidInputError("The SDXL model returned no 'vector' conditioning.")
        return Conditioning(
            context=torch.cat(contexts), pooled=torch.cat(vectors) if vectors else None
        )

    # -- denoising

    def _model_cond(self, cond: Conditioning) -> Any:
        """What ``apply_model`` takes: the context tensor, or SDXL's sgm dict."""
        context = cond.context.to(self.device)
        if self.architecture is not Architecture.SDXL:
            return context
        if cond.pooled is None:
            raise InvalidInputError("SDXL conditioning needs the 'vector' (pooled) input.")
        return {"crossattn": context, "vector": cond.pooled.to(self.device)}

    def predict_noise(
        self, latents: torch.Tensor, timestep: int, cond: Conditioning
    ) -> torch.Tensor:
        """One ``apply_model`` call on ``latents`` ``[B, 4, h, w]``; returns ε or v like the
        model does, fp32 ``[B, 4, h, w]``. Only the latents and the conditioning are sent to
        ``devices.device``; the UNet stays where medvram / lowvram keep it."""
        return in_batches(
            lambda x, c: self._apply_model(x, timestep, c), latents, cond, self.max_batch
        )

    def _apply_model(
        self, latents: torch.Tensor, timestep: int, cond: Conditioning
    ) -> torch.Tensor:
        x = latents.to(self.device)
        t = torch.full((x.shape[0],), int(timestep), device=self.device, dtype=torch.long)
        with self.devices.autocast():
            out = self.sd_model.apply_model(x, t, self._model_cond(cond))
        return out.float()

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
        """The shared recording run (:func:`ddim_sample`) through ``apply_model``; returns
        ``[B, 4, size/8, size/8]``."""
        return ddim_sample(
            lambda x, t: self.predict_noise(x, t, cond),
            self.sd_model.alphas_cumprod,
            cond.context.shape[0],
            steps=steps,
            size=size,
            seed=seed,
            v_prediction=getattr(self.sd_model, "parameterization", "eps") == "v",
            callback=callback,
            noise_period=noise_period,
        )

    # -- weight guard

    def _models(self) -> list[torch.nn.Module]:
        return [self.unet, *(e.model for e in self.text_encoders)]

    @contextmanager
    def clean_weights(self) -> Iterator[None]:
        """Take the Lora extension's merged LoRAs out, run, put everything back.

        Everything is put back before anything is checked, whatever stopped the run (an
        error in any stage, an interrupt, running out of memory, or a failure while taking
        the LoRAs out); then every UNet / text-encoder weight is checked to be
        bit-identical to before (by fingerprint).
        """
        models = self._models()
        before = [weights_fingerprint(m) for m in models]
        saved: list[_Saved] = []
        loaded = self._loaded_networks()
        try:
            self._unmerge_host_loras(saved)
            yield
        finally:
            self._remerge(saved, loaded)
            changed = [type(m).__name__ for m in changed_weights(models, before)]
            if changed:
                raise LoraClrError(
                    f"Weights of {', '.join(changed)} changed during the merge; restart the "
                    "WebUI or reload the checkpoint before generating."
                )

    def _loaded_networks(self) -> list[Any] | None:
        """The Lora extension's ``loaded_networks`` as they are now (``None``: no extension
        able to restore weights, so nothing is taken out)."""
        nets = self.networks
        if nets is None or not hasattr(nets, "network_restore_weights_from_backup"):
            return None
        return list(getattr(nets, "loaded_networks", []))

    def _unmerge_host_loras(self, saved: list[_Saved]) -> None:
        """Restore clean weights from the Lora extension's backups (dossier §4.6), noting
        in ``saved`` each module before it is touched, so a failure halfway is undone."""
        if self._loaded_networks() is None:
            return
        nets = self.networks
        for module in getattr(self.sd_model, "network_layer_mapping", {}).values():
            names = getattr(module, "network_current_names", ())
            if not names:
                continue
            with torch.inference_mode(False):
                tensors = {
                    k: readable(t).to("cpu", copy=True) for k, t in _weight_tensors(module).items()
                }
            saved.append(_Saved(module, names, tensors))
            nets.network_restore_weights_from_backup(module)
            module.network_current_names = ()
        nets.loaded_networks.clear()

    def _remerge(self, saved: list[_Saved], loaded: list[Any] | None) -> None:
        """Put the LoRA-merged weights and the Lora extension's state back (every module,
        even when one of them fails; the first failure is raised afterwards)."""
        failure: BaseException | None = None
        for item in saved:
            try:
                live = _weight_tensors(item.module)
                for name, tensor in item.tensors.items():
                    write_into(live[name], tensor)
            except Exception as exc:  # restore the rest, then raise
                failure = failure or exc
            item.module.network_current_names = item.names
        if loaded is not None:
            self.networks.loaded_networks[:] = loaded
        if failure is not None:
            raise failure
