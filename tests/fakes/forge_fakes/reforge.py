"""reForge ``main`` stand-ins (forge.md §5): an A1111-shaped model over the old Forge
backend — ComfyUI-style patchers that back weights up per patcher when patched and
restore them when a clone is unloaded, and ``ldm_patched.modules.model_management``."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from forge_fakes.common import DiscreteSchedule, TinyParts, apply_in_sigma_space, encode_prompts
from forge_fakes.new_forge import ForgeObjects, _set_param
from loraclr_ext.model.architecture import Architecture

CPU = torch.device("cpu")


class ComfyPatcher:
    """``ldm_patched.modules.model_patcher.ModelPatcher`` (reForge ``main``): ``patches``
    per parameter key under a ``patches_uuid`` (new on every ``add_patches``); clones
    share one ``backup`` dict; the model records which patch set its weights carry
    (``current_weight_patches_uuid``), and loading a patcher whose set differs restores
    the backup before merging its own."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.patches: dict[str, list[tuple[float, torch.Tensor, float]]] = {}
        self.backup: dict[str, torch.Tensor] = {}
        self.patches_uuid = uuid.uuid4()
        self.load_device = CPU
        self.offload_device = CPU
        if not hasattr(model, "current_weight_patches_uuid"):
            model.current_weight_patches_uuid = None

    def clone(self) -> ComfyPatcher:
        twin = ComfyPatcher(self.model)
        twin.patches = {k: list(v) for k, v in self.patches.items()}
        twin.backup = self.backup
        twin.patches_uuid = self.patches_uuid
        return twin

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def add_patches(self, patches: dict, strength_patch=1.0, strength_model=1.0) -> list[str]:
        known = dict(self.model.named_parameters())
        kept = [k for k in patches if k in known]
        for key in kept:
            self.patches.setdefault(key, []).append((strength_patch, patches[key], strength_model))
        self.patches_uuid = uuid.uuid4()
        return kept

    def model_dtype(self) -> torch.dtype:
        return self.model.get_dtype()

    @torch.no_grad()
    def patch_model(self) -> None:
        current = self.model.current_weight_patches_uuid
        if current == self.patches_uuid:
            return
        if current is not None:
            self.unpatch_model()
        for key, items in self.patches.items():
            param = self.model.get_parameter(key)
            self.backup.setdefault(key, param.detach().clone())
            weight = param.detach().float()
            for strength_patch, delta, strength_model in items:
                weight = strength_model * weight + strength_patch * delta.float()
            _set_param(self.model, key, weight.to(param.dtype))
        self.model.current_weight_patches_uuid = self.patches_uuid

    @torch.no_grad()
    def unpatch_model(self) -> None:
        for key, weight in self.backup.items():
            _set_param(self.model, key, weight)
        self.backup.clear()
        self.model.current_weight_patches_uuid = None


@dataclass
class LoadedModel:
    """``model_management.LoadedModel``: ``model_unload`` detaches the patcher, restoring
    its backed-up weights when ``unpatch_weights``."""

    model: ComfyPatcher
    unloads: int = 0

    def model_unload(
        self, memory_to_free: float | None = None, unpatch_weights: bool = True
    ) -> bool:
        self.unloads += 1
        if unpatch_weights:
            self.model.unpatch_model()
        return True


class ModelManagement:
    """``ldm_patched.modules.model_management``: loading a patcher drops its loaded clones
    (itself included) from the list without unpatching them, then loads it, which
    re-patches only if the weights carry another patch set."""

    def __init__(self) -> None:
        self.current_loaded_models: list[LoadedModel] = []
        self.load_calls = 0

    def get_torch_device(self) -> torch.device:
        return CPU

    def load_models_gpu(self, models, memory_required=0, force_patch_weights=False) -> None:
        self.load_calls += 1
        for patcher in models:
            self.current_loaded_models = [
                e for e in self.current_loaded_models if not e.model.is_clone(patcher)
            ]
            patcher.patch_model()
            self.current_loaded_models.insert(0, LoadedModel(patcher))

    def load_model_gpu(self, model) -> None:
        self.load_models_gpu([model])

    def unload_all_models(self) -> None:
        for entry in self.current_loaded_models:
            entry.model.unpatch_model()
        self.current_loaded_models.clear()

    def soft_empty_cache(self, force: bool = False) -> None:
        pass


class BaseModel(torch.nn.Module):
    """ComfyUI ``BaseModel``: ``diffusion_model``, ``model_sampling``, ``apply_model``."""

    def __init__(self, parts: TinyParts, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.diffusion_model = parts.unet
        self.model_sampling = DiscreteSchedule(parts.alphas_cumprod, parts.prediction_type)
        self.dtype = dtype

    def get_dtype(self) -> torch.dtype:
        return self.dtype

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, **kwargs):
        return apply_in_sigma_space(
            self.model_sampling, self.diffusion_model, self.dtype, x, t, c_crossattn, **kwargs
        )


class SDClipModel(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer


def comfy_tokenizer(tok: Any) -> Any:
    """The HF tokenizer as ldm_patched loads it: its tokenizer_config says
    ``model_max_length`` 8192, not CLIP's 77 (the chunking is done by ``SDTokenizer``)."""
    twin = copy.deepcopy(tok)
    twin.model_max_length = 8192
    return twin


class ComfyCLIP:
    """ComfyUI ``CLIP``: ``cond_stage_model`` with ``clip_l`` / ``clip_h`` / ``clip_g``
    attributes, ``tokenizer.<key>.tokenizer`` (HF), ``patcher``."""

    def __init__(self, parts: TinyParts) -> None:
        self.cond_stage_model = torch.nn.Module()
        for key, model in parts.text.items():
            self.cond_stage_model.add_module(key, SDClipModel(model))
        self.tokenizer = type("SD1Tokenizer", (), {})()
        for key, tok in parts.tokenizers.items():
            comfy = {"tokenizer": comfy_tokenizer(tok), "max_length": 77}
            setattr(self.tokenizer, key, type("SDTokenizer", (), comfy)())
        self.patcher = ComfyPatcher(self.cond_stage_model)

    def clone(self) -> ComfyCLIP:
        twin = ComfyCLIP.__new__(ComfyCLIP)
        twin.__dict__.update(self.__dict__)
        twin.patcher = self.patcher.clone()
        return twin


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model


class CondStage(torch.nn.Module):
    """The A1111 text wrapper reForge builds over ``forge_objects.clip`` (tokenizer only)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer


class FakeReforgeModel(torch.nn.Module):
    """``shared.sd_model`` on reForge: A1111 attributes plus ``forge_objects*``."""

    def __init__(self, parts: TinyParts, memory: ModelManagement) -> None:
        super().__init__()
        self.is_sd1 = parts.arch is Architecture.SD1
        self.is_sd2 = parts.arch is Architecture.SD2
        self.is_sdxl = parts.arch is Architecture.SDXL
        self.is_sd3 = False
        self.parameterization = "v" if parts.prediction_type == "v_prediction" else "eps"
        self.parts = parts
        self.memory = memory
        base = BaseModel(parts)
        self.model = DiffusionWrapper(base.diffusion_model)
        clip = ComfyCLIP(parts)
        first = next(iter(parts.tokenizers))
        self.cond_stage_model = CondStage(getattr(clip.tokenizer, first).tokenizer)
        self.register_buffer("alphas_cumprod", parts.alphas_cumprod.clone())
        self.forge_objects = ForgeObjects(ComfyPatcher(base), clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.conditioning_calls = 0

    def get_learned_conditioning(self, prompts: list[str]) -> Any:
        self.memory.load_model_gpu(self.forge_objects.clip.patcher)
        self.conditioning_calls += 1
        with torch.no_grad():
            return encode_prompts(self.parts, list(prompts))

    @torch.no_grad()
    def generate(self, prompt: str, seed: int = 0, steps: int = 3, size: int = 64) -> bytes:
        """txt2img as reForge runs it (A1111's processing, ``torch.no_grad``): the
        conditioning through ``forge_objects.clip``, ``forge_objects.unet`` loaded, Euler
        steps in sigma space through its ``apply_model``; the final latents as bytes."""
        from forge_fakes.new_forge import euler_latents

        cond = self.get_learned_conditioning([prompt])
        unet = self.forge_objects.unet
        self.memory.load_models_gpu([unet])
        model = unet.model
        kwargs = {"c_crossattn": cond}
        return euler_latents(model.apply_model, model.model_sampling, kwargs, seed, steps, size)

    def generate_with_lora(self, filename: str, unet: dict, clip: dict) -> None:
        """A generation with ``<lora:…>``: patched clones loaded, weights merged."""
        objects = self.forge_objects_original.shallow_copy()
        objects.unet = objects.unet.clone()
        objects.clip = objects.clip.clone()
        objects.unet.add_patches(unet)
        objects.clip.patcher.add_patches(clip)
        self.forge_objects_after_applying_lora = objects
        self.forge_objects = objects.shallow_copy()
        self.current_lora_hash = str([[filename, 1.0, 1.0]])
        self.memory.load_models_gpu([objects.unet, objects.clip.patcher])
