"""New Forge (``backend/``) stand-ins: engine, patchers, LoRA loader, memory management,
``sd_models`` and the Lora extension's ``networks`` (forge.md §1.8, §2, §3, §4)."""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from forge_fakes.common import DiscreteSchedule, TinyParts, apply_in_sigma_space, encode_prompts
from loraclr_ext.model.architecture import Architecture

CPU = torch.device("cpu")


def _set_param(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


class LoraLoader:
    """One per underlying model, shared by all its patchers (§3.5): ``refresh`` restores
    every backed-up weight, then merges the patcher's ``lora_patches`` into the weights
    (fp32 maths, cast back to the storage dtype), backing originals up first. Runs in
    inference mode; does nothing when the patch set equals the loaded one."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.backup: dict[str, torch.Tensor] = {}
        self.loaded_hash = str([])
        self.refreshes = 0

    @torch.inference_mode()
    def refresh(self, lora_patches: dict, offload_device: torch.device = CPU) -> None:
        wanted = str(sorted(lora_patches, key=str))
        if wanted == self.loaded_hash:
            return
        self.refreshes += 1
        for key, weight in self.backup.items():
            _set_param(self.model, key, weight.clone())
        self.backup.clear()
        for (_, strength_patch, strength_model, _), patches in lora_patches.items():
            for key, delta in patches.items():
                param = self.model.get_parameter(key)
                if key not in self.backup:
                    self.backup[key] = param.detach().to(offload_device, copy=True)
                merged = strength_model * param.detach().float() + strength_patch * delta.float()
                _set_param(self.model, key, merged.to(param.dtype))
        self.loaded_hash = wanted


class ModelPatcher:
    """``backend.patcher.base.ModelPatcher``: a model plus LoRA patches keyed
    ``(filename, strength_patch, strength_model, online_mode)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.lora_patches: dict[tuple, dict[str, torch.Tensor]] = {}
        self.load_device = CPU
        self.offload_device = CPU
        self.current_device = CPU
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)

    @property
    def lora_loader(self) -> LoraLoader:
        return self.model.lora_loader

    def clone(self) -> ModelPatcher:
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.lora_patches = dict(self.lora_patches)
        twin.model_options = {"transformer_options": {}}
        return twin

    def add_patches(
        self,
        *,
        filename: str,
        patches: dict[str, torch.Tensor],
        strength_patch: float = 1.0,
        strength_model: float = 1.0,
        online_mode: bool = False,
    ) -> list[str]:
        known = dict(self.model.named_parameters())
        kept = {k: v for k, v in patches.items() if k in known}
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = kept
        return list(kept)

    def refresh_loras(self) -> None:
        self.lora_loader.refresh(self.lora_patches, self.offload_device)


class UnetPatcher(ModelPatcher):
    """``backend.patcher.unet.UnetPatcher``."""


class KModel(torch.nn.Module):
    """``backend.modules.k_model.KModel``: the raw network, its ``predictor`` and dtypes."""

    def __init__(self, parts: TinyParts, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.diffusion_model = parts.unet
        self.predictor = DiscreteSchedule(parts.alphas_cumprod, parts.prediction_type)
        self.storage_dtype = dtype
        self.computation_dtype = dtype
        self.apply_calls = 0

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, **kwargs):
        self.apply_calls += 1
        dtype = self.computation_dtype
        return apply_in_sigma_space(
            self.predictor, self.diffusion_model, dtype, x, t, c_crossattn, **kwargs
        )


class IntegratedCLIP(torch.nn.Module):
    """``backend.nn.clip.IntegratedCLIP``: an HF CLIP text model under ``.transformer``."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer


class ObjectDict(dict):
    """Forge's ``ObjectDict``: keys readable as attributes too."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class CLIP:
    """``backend.patcher.clip.CLIP``: ``cond_stage_model`` (a ModuleDict of
    ``IntegratedCLIP``), ``tokenizer`` with the same keys, ``patcher``."""

    def __init__(self, parts: TinyParts) -> None:
        self.cond_stage_model = torch.nn.ModuleDict(
            {k: IntegratedCLIP(m) for k, m in parts.text.items()}
        )
        self.tokenizer = ObjectDict(parts.tokenizers)
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self) -> CLIP:
        twin = CLIP.__new__(CLIP)
        twin.__dict__.update(self.__dict__)
        twin.patcher = self.patcher.clone()
        return twin

    def add_patches(self, **kwargs: Any) -> list[str]:
        return self.patcher.add_patches(**kwargs)


@dataclass
class ForgeObjects:
    """``backend.diffusion_engine.base.ForgeObjects``."""

    unet: Any
    clip: Any
    vae: Any = None
    clipvision: Any = None

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


@dataclass
class LoadedModel:
    """``memory_management.LoadedModel``: a loaded patcher; ``model_unload`` undoes its
    object patches and, unless ``avoid_model_moving``, moves the model to the patcher's
    offload device (§2.7)."""

    model: Any  # the patcher
    unloads: int = 0

    def model_unload(self, avoid_model_moving: bool = False) -> None:
        self.unloads += 1
        if not avoid_model_moving:
            self.model.model.to(self.model.offload_device)
            self.model.current_device = self.model.offload_device


class MemoryManagement:
    """``backend.memory_management``: loading a patcher unloads its clones (same model)
    and calls ``refresh_loras``; a patcher already loaded is left alone (§2.7)."""

    def __init__(self) -> None:
        self.current_loaded_models: list[LoadedModel] = []
        self.load_calls = 0

    def get_torch_device(self) -> torch.device:
        return CPU

    def load_models_gpu(self, models, memory_required=0, hard_memory_preservation=0) -> None:
        self.load_calls += 1
        for patcher in models:
            if any(entry.model is patcher for entry in self.current_loaded_models):
                continue
            self.current_loaded_models = [
                e for e in self.current_loaded_models if e.model.model is not patcher.model
            ]
            patcher.refresh_loras()
            self.current_loaded_models.insert(0, LoadedModel(patcher))

    def load_model_gpu(self, model) -> None:
        self.load_models_gpu([model])

    def unload_all_models(self) -> None:
        self.current_loaded_models.clear()

    def soft_empty_cache(self, force: bool = False) -> None:
        pass


class FakeForgeEngine:
    """A ``ForgeDiffusionEngine`` (SD1 ``StableDiffusion``, SD2, SDXL): no ``model``, no
    ``cond_stage_model``; conditioning through ``forge_objects.clip`` in inference mode."""

    def __init__(
        self,
        parts: TinyParts,
        memory: MemoryManagement,
        text_storage: torch.dtype = torch.float32,
    ) -> None:
        self.is_sd1 = parts.arch is Architecture.SD1
        self.is_sd2 = parts.arch is Architecture.SD2
        self.is_sdxl = parts.arch is Architecture.SDXL
        self.is_sd3 = False
        self.cond_stage_model = None
        self.first_stage_model = None
        self.parts = parts
        self.memory = memory
        unet = UnetPatcher(KModel(parts))
        clip = CLIP(parts)
        self.forge_objects = ForgeObjects(unet, clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.conditioning_calls = 0
        if text_storage != torch.float32:
            # Forge keeps the text encoders in ``text_encoder_dtype()`` storage, which is
            # fp16 on a CPU; its text engine casts the two embeddings to fp32 on every call.
            for embeddings in self._embeddings():
                embeddings.to(text_storage)

    def _embeddings(self) -> list[torch.nn.Module]:
        return [
            m.get_submodule(n)
            for m in self.parts.text.values()
            for n, _ in m.named_modules()
            if n.endswith(("token_embedding", "position_embedding"))
        ]

    def is_webui_legacy_model(self) -> bool:
        return self.is_sd1 or self.is_sd2 or self.is_sdxl

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts: list[str]) -> Any:
        self.memory.load_model_gpu(self.forge_objects.clip.patcher)
        self.conditioning_calls += 1
        for embeddings in self._embeddings():
            # What Forge's ClassicTextProcessingEngine does before every encode (module
            # reassigned to ``.to(dtype=float32)``): a no-op once they are fp32, a swap
            # of every parameter's data the first time.
            embeddings.to(dtype=torch.float32)
        return encode_prompts(self.parts, list(prompts), getattr(prompts, "width", 1024))

    @torch.inference_mode()
    def generate(self, prompt: str, seed: int = 0, steps: int = 3, size: int = 64) -> bytes:
        """txt2img as Forge runs it, in inference mode: conditioning through
        ``forge_objects.clip``, the UNet of ``forge_objects.unet`` loaded, Euler steps over
        the model's sigmas in ``apply_model``; the final latents as bytes, so two
        generations can be compared exactly."""
        cond = self.get_learned_conditioning([prompt])
        unet = self.forge_objects.unet
        self.memory.load_models_gpu([unet])
        kwargs = (
            {"c_crossattn": cond}
            if not isinstance(cond, dict)
            else {"c_crossattn": cond["crossattn"], "y": cond["vector"]}
        )
        return euler_latents(
            unet.model.apply_model, unet.model.predictor, kwargs, seed, steps, size
        )

    def generate_with_lora(self, filename: str, unet: dict, clip: dict) -> None:
        """What a generation with ``<lora:…>`` leaves behind (§2.2, §3.2, §3.5): patched
        clones in ``forge_objects_after_applying_lora`` and ``forge_objects``, loaded, so
        their patches are merged into the shared weights."""
        objects = self.forge_objects_original.shallow_copy()
        objects.unet = objects.unet.clone()
        objects.clip = objects.clip.clone()
        objects.unet.add_patches(filename=filename, patches=unet)
        objects.clip.add_patches(filename=filename, patches=clip)
        self.forge_objects_after_applying_lora = objects
        self.forge_objects = objects.shallow_copy()
        self.current_lora_hash = str([[filename, 1.0, 1.0, False]])
        self.memory.load_models_gpu([objects.unet, objects.clip.patcher])


def euler_latents(apply_model, schedule, kwargs: dict, seed: int, steps: int, size: int) -> bytes:
    """A k-diffusion Euler run (no CFG) through a sigma-space ``apply_model``; the final
    latents as bytes."""
    sigmas = schedule.sigmas
    picks = torch.linspace(len(sigmas) - 1, 0, steps).round().long()
    levels = [*sigmas[picks].tolist(), 0.0]
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 4, size // 8, size // 8), generator=gen) * levels[0]
    for sigma, following in itertools.pairwise(levels):
        denoised = apply_model(x, torch.tensor([sigma]), **kwargs)
        x = x + (x - denoised) / sigma * (following - sigma)
    return x.numpy().tobytes()


class FakeInitialModel:
    """What ``shared.sd_model`` is on Forge before the first load (§1.8)."""

    cond_stage_model = None
    chunk_length = 75

    def get_prompt_lengths_on_ui(self, prompt: str) -> tuple[int, int]:
        return 0, 75


class FakeSdModels:
    """``modules.sd_models`` on Forge: ``model_data``, ``checkpoints_list`` and
    ``forge_model_reload``. ``checkpoint=False`` is a Forge with no checkpoint file at all:
    ``select_checkpoint()`` gave ``None`` at start-up and every reload raises Forge's
    ``ValueError('You do not have any model! …')``, dropping the placeholder model."""

    def __init__(self, build, checkpoint: bool = True) -> None:
        self._build = build
        info = "t.safetensors" if checkpoint else None
        self.checkpoints_list = {info: info} if info else {}
        self.model_data = SimpleNamespace(
            sd_model=FakeInitialModel(),
            forge_hash="",
            forge_loading_parameters={"checkpoint_info": info, "additional_modules": []},
        )
        self.reloads = 0

    @torch.inference_mode()
    def forge_model_reload(self) -> tuple[Any, bool]:
        self.reloads += 1
        wanted = str(self.model_data.forge_loading_parameters)
        if self.model_data.forge_hash == wanted:
            return self.model_data.sd_model, False
        if self.model_data.sd_model:
            self.model_data.sd_model = None
        if self.model_data.forge_loading_parameters["checkpoint_info"] is None:
            raise ValueError(
                "You do not have any model! Please download at least one model in "
                "[models/Stable-diffusion]."
            )
        self.model_data.sd_model = self._build()
        self.model_data.forge_hash = wanted
        return self.model_data.sd_model, True


class FakeNetworks:
    """The Lora extension's ``networks`` on Forge: the file list and the state-dict cache
    keyed by file name (§3.1, §4)."""

    def __init__(self, lora_dir: str) -> None:
        self.lora_dir = lora_dir
        self.available_networks: dict[str, str] = {}
        self.refresh_calls = 0
        self.load_lora_state_dict = functools.lru_cache(maxsize=5)(self._read)

    @staticmethod
    def _read(filename: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(filename)

    def list_available_networks(self) -> None:
        self.refresh_calls += 1
        self.available_networks.clear()
        for folder, _, files in os.walk(self.lora_dir):
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext in (".safetensors", ".pt", ".ckpt"):
                    self.available_networks[stem] = os.path.join(folder, name)
