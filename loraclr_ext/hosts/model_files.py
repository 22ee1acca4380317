"""Offline loading of base models for the standalone host.

Two on-disk forms are accepted:

* a **diffusers model folder** (``model_index.json``, ``unet/``, ``text_encoder/`` …);
* a **single-file checkpoint** ``.safetensors`` in the original ldm/SGM layout, as WebUI
  users keep them. Its architecture is read from the keys; the component configs come from
  the small JSON files shipped in ``hosts/configs/<arch>/`` (real SD1.5 / SD2.1 / SDXL-base
  values) or from a diffusers folder the caller names, and diffusers' own single-file
  converters do the key mapping with ``local_files_only=True``. The VAE is never loaded:
  the merge does not decode images.

Tokenizers are never downloaded: they come from the model folder, a folder the caller names,
or the local Hugging Face cache; otherwise :class:`ModelNotFoundError` lists what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraclr_ext.errors import InvalidInputError, ModelNotFoundError
from loraclr_ext.model.architecture import Architecture

CONFIG_ROOT = Path(__file__).with_name("configs")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
CLIP_MAX_LENGTH = 77

# Hub repositories (and sub-folders) whose cached copies hold a CLIP BPE tokenizer usable
# for each architecture. All of them share CLIP's vocabulary; only the pad token differs.
_CACHED_TOKENIZERS: dict[Architecture, tuple[tuple[str, str], ...]] = {
    Architecture.SD1: (
        ("openai/clip-vit-large-patch14", ""),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
        ("runwayml/stable-diffusion-v1-5", "tokenizer"),
        ("CompVis/stable-diffusion-v1-4", "tokenizer"),
    ),
    Architecture.SD2: (
        ("stabilityai/stable-diffusion-2-1", "tokenizer"),
        ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
        ("stabilityai/stable-diffusion-2", "tokenizer"),
        ("openai/clip-vit-large-patch14", ""),
    ),
    Architecture.SDXL: (
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
        ("openai/clip-vit-large-patch14", ""),
    ),
}

# Keys that identify the text encoder family of an ldm/SGM checkpoint.
_SDXL_KEY = "conditioner.embedders.1.model.positional_embedding"
_SD2_KEY = "cond_stage_model.model.token_embedding.weight"
_SD1_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class Tokenizers:
    """The CLIP tokenizer(s) of a model; ``second`` only for SDXL."""

    first: Any
    second: Any | None = None


# ----------------------------------------------------------------------------- tokenizers


def _has_tokenizer_files(folder: Path) -> bool:
    return (
        all((folder / name).is_file() for name in TOKENIZER_FILES)
        or (folder / "tokenizer.json").is_file()
    )


def hf_cache_dirs(arch: Architecture) -> list[Path]:
    """Folders in the local Hugging Face cache that may hold ``arch``'s tokenizer."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE)
    found: list[Path] = []
    for repo, sub in _CACHED_TOKENIZERS[arch]:
        snapshots = hub / f"models--{repo.replace('/', '--')}" / "snapshots"
        if snapshots.is_dir():
            found += [s / sub if sub else s for s in sorted(snapshots.iterdir())]
        else:
            found.append(snapshots / "<revision>" / sub if sub else snapshots / "<revision>")
    return found


def _candidates(folder: Path, sub: str) -> list[Path]:
    """A folder the user named may be the tokenizer folder itself or a model folder."""
    return [folder / sub, folder]


def find_tokenizer_dir(arch: Architecture, search: list[Path], sub: str = "tokenizer") -> Path:
    """The first of ``search`` (each tried as ``<dir>/<sub>`` and ``<dir>``), then the HF
    cache, that holds ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``).

    Raises:
        ModelNotFoundError: naming the missing files and every folder looked in.
    """
    looked: list[Path] = []
    for folder in search:
        looked += _candidates(Path(folder), sub)
    looked += hf_cache_dirs(arch)
    for folder in looked:
        if folder.is_dir() and _has_tokenizer_files(folder):
            return folder
    places = "\n  ".join(str(p) for p in dict.fromkeys(looked))
    raise ModelNotFoundError(
        f"No CLIP tokenizer found for this {arch.label} model: the files "
        f"{' and '.join(TOKENIZER_FILES)} are missing. Looked in:\n  {places}\n"
        "Pass a folder that contains them (for example a diffusers model's 'tokenizer' "
        "folder) with --tokenizer, or copy them into the model folder."
    )


def _load_clip_tokenizer(folder: Path, pad_token: str | None = None) -> Any:
    from transformers import CLIPTokenizer

    extra: dict[str, Any] = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(
        str(folder), local_files_only=True, model_max_length=CLIP_MAX_LENGTH, **extra
    )


def load_tokenizers(arch: Architecture, search: list[Path]) -> Tokenizers:
    """Load the tokenizer(s) for ``arch`` from ``search`` folders or the HF cache.

    SDXL's second tokenizer is ``tokenizer_2/`` when present; otherwise the first one's
    files with pad token ``!`` (the released SDXL ships exactly that: same vocabulary).
    SD2 pads with ``!`` too when its files come from a plain CLIP folder.
    """
    first_dir = find_tokenizer_dir(arch, search, "tokenizer")
    own_config = (first_dir / "tokenizer_config.json").is_file()
    pad = "!" if arch is Architecture.SD2 and not own_config else None
    first = _load_clip_tokenizer(first_dir, pad)
    if arch is not Architecture.SDXL:
        return Tokenizers(first)
    second_dirs = [Path(f) / "tokenizer_2" for f in search]
    second_dir = next((d for d in second_dirs if d.is_dir() and _has_tokenizer_files(d)), None)
    if second_dir is None:
        return Tokenizers(first, _load_clip_tokenizer(first_dir, "!"))
    return Tokenizers(first, _load_clip_tokenizer(second_dir))


# ------------------------------------------------------------------------ diffusers folder


def read_model_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(
            f"'{folder}' is not a diffusers model folder: model_index.json is missing."
        )
    return json.loads(index.read_text(encoding="utf-8"))


def folder_is_sdxl(folder: Path) -> bool:
    """A folder is SDXL when its index names a second text encoder."""
    entry = read_model_index(folder).get("text_encoder_2")
    if not entry:
        return False
    return entry[0] is not None


def load_folder_pipeline(
    folder: Path, dtype: torch.dtype, tokenizers: Tokenizers, sdxl: bool
) -> Any:
    """Load a diffusers folder without VAE, safety checker or any network access."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "dtype": dtype,
        "vae": None,
        "tokenizer": tokenizers.first,
    }
    if sdxl:
        return StableDiffusionXLPipeline.from_pretrained(
            str(folder), tokenizer_2=tokenizers.second, **kwargs
        )
    return StableDiffusionPipeline.from_pretrained(
        str(folder),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **kwargs,
    )


# ---------------------------------------------------------------------- single-file (ldm)


def checkpoint_architecture(path: Path) -> Architecture:
    """SD1 / SD2 / SDXL of an ldm/SGM ``.safetensors`` file, from its text-encoder keys
    (read from the header only, no tensor is loaded).

    Raises:
        InvalidInputError: the file has no known text encoder or UNet.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    if _UNET_CONV_IN not in keys:
        raise InvalidInputError(
            f"'{path}' is not a Stable Diffusion checkpoint in the original layout "
            f"(no '{_UNET_CONV_IN}'). Pass a diffusers folder or a full SD1/SD2/SDXL "
            "checkpoint."
        )
    if _SDXL_KEY in keys:
        return Architecture.SDXL
    if _SD2_KEY in keys:
        return Architecture.SD2
    if _SD1_KEY in keys:
        return Architecture.SD1
    raise InvalidInputError(
        f"'{path}' has a UNet but no text encoder this tool recognises (SD1 CLIP, SD2 "
        "OpenCLIP or SDXL's two encoders); refiner and inpainting variants are not supported."
    )


def builtin_config(arch: Architecture) -> Path:
    """The shipped diffusers config folder for ``arch`` (no weights, no tokenizer)."""
    return CONFIG_ROOT / arch.value


def load_single_file_pipeline(
    path: Path, arch: Architecture, config: Path, dtype: torch.dtype, tokenizers: Tokenizers
) -> Any:
    """Build the pipeline from an ldm checkpoint with diffusers' converters, fully offline.

    ``config`` is a diffusers-layout folder with ``model_index.json`` and the ``unet``,
    ``text_encoder`` (``text_encoder_2``) and ``scheduler`` configs.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs: dict[str, Any] = {
        "config": str(config),
        "local_files_only": True,
        "dtype": dtype,
        "vae": None,
        "tokenizer": tokenizers.first,
    }
    if arch is Architecture.SDXL:
        return StableDiffusionXLPipeline.from_single_file(
            str(path), tokenizer_2=tokenizers.second, **kwargs
        )
    return StableDiffusionPipeline.from_single_file(
        str(path),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **kwargs,
    )


def _text_checks(arch: Architecture, layers: list[int]) -> list[tuple[str, str, int]]:
    """``(checkpoint key, live parameter suffix, encoder index)`` pairs that must be equal
    after conversion: the first and last weights of each encoder. diffusers loads text
    encoders with ``strict=False``, so a silently skipped key would otherwise go unnoticed."""
    hf = "encoder.layers.{}.mlp.fc2.weight"
    if arch is Architecture.SD1:
        pre = "cond_stage_model.transformer.text_model."
        return [
            (pre + "embeddings.token_embedding.weight", "embeddings.token_embedding.weight", 0),
            (pre + hf.format(layers[0] - 1), hf.format(layers[0] - 1), 0),
        ]
    if arch is Architecture.SD2:
        pre = "cond_stage_model.model."
        last = f"transformer.resblocks.{layers[0] - 1}.mlp.c_proj.weight"
        return [
            (pre + "token_embedding.weight", "embeddings.token_embedding.weight", 0),
            (pre + last, hf.format(layers[0] - 1), 0),
        ]
    pre1 = "conditioner.embedders.0.transformer.text_model."
    pre2 = "conditioner.embedders.1.model."
    last2 = f"transformer.resblocks.{layers[1] - 1}.mlp.c_proj.weight"
    return [
        (pre1 + "embeddings.token_embedding.weight", "embeddings.token_embedding.weight", 0),
        (pre1 + hf.format(layers[0] - 1), hf.format(layers[0] - 1), 0),
        (pre2 + "token_embedding.weight", "embeddings.token_embedding.weight", 1),
        (pre2 + last2, hf.format(layers[1] - 1), 1),
    ]


def _hf_config(encoder: torch.nn.Module) -> Any:
    """A transformers text encoder's ``config`` (a ``PretrainedConfig``, untyped here)."""
    config = encoder.config
    if isinstance(config, (torch.Tensor, torch.nn.Module)):
        raise TypeError(f"{type(encoder).__name__}.config is not a transformers config.")
    return config


def verify_text_encoders(path: Path, arch: Architecture, encoders: list[torch.nn.Module]) -> None:
    """Check that converted text-encoder weights equal the checkpoint's.

    Raises:
        ModelNotFoundError: a checked weight was not loaded from the file.
    """
    from safetensors import safe_open

    layers = [int(_hf_config(e).num_hidden_layers) for e in encoders]
    with safe_open(str(path), framework="pt") as f:
        for key, suffix, index in _text_checks(arch, layers):
            params = dict(encoders[index].named_parameters())
            live = params.get(suffix, params.get("text_model." + suffix))
            expected = f.get_tensor(key)
            if live is None or not torch.equal(live.detach().cpu(), expected.to(live.dtype)):
                raise ModelNotFoundError(
                    f"Text encoder weight '{key}' of '{path}' was not loaded by the converter; "
                    "the checkpoint layout is not supported."
                )
