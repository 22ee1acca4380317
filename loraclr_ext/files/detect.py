"""Which base model a LoRA was trained for, from its keys, shapes and metadata.

Keys and shapes are evidence about the file's actual tensors, so they are asked first;
metadata (written by the trainer, sometimes wrong or missing) decides only when the
tensors do not. Each clue votes for one architecture; disagreeing clues make the answer
undecidable (``None``) rather than a guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from loraclr_ext.files.formats import FormatError, Shape, ShapeInfo, claim
from loraclr_ext.files.keys import foreign_family, group_keys
from loraclr_ext.model.architecture import Architecture

_CROSS_DIM = {768: Architecture.SD1, 1024: Architecture.SD2, 2048: Architecture.SDXL}
_TEXT_DIM = {768: Architecture.SD1, 1024: Architecture.SD2}
_CROSS_KV = re.compile(r"attn2[._]to_[kv]$")
_TEXT_Q = re.compile(r"^(lora_te_|text_encoder\.|clip_l\.).*self_attn[._]q_proj$")
_TE_LAYER = re.compile(r"^(?:lora_te_|text_encoder\.|clip_l\.).*layers[._](\d+)[._]")
_PROJ_IN = re.compile(
    r"(?:^lora_unet_|^lycoris_|^unet\.).*(?:attentions|input_blocks|output_blocks).*proj_in$"
)
_SDXL_ONLY = ("lora_te2_", "text_encoder_2.", "clip_g.", "text_encoders.clip_g.")
"""Prefixes of SDXL's second text encoder. ``lora_te1_`` alone decides nothing: diffusers'
``convert_state_dict_to_kohya`` writes it for SD1's only text encoder too."""
_DEEP_BLOCK = re.compile(r"transformer_blocks[._][1-9]")
"""A second transformer block per attention exists only in SDXL (depth 2 and 10)."""
_FOREIGN_HINT = ("transformer.", "lora_transformer_", "lycoris_transformer_")
_FOREIGN_VERSIONS: tuple[tuple[str, str], ...] = (
    ("flux", "Flux"),
    ("chroma", "Chroma"),
    ("sd3", "SD3"),
    ("stable-diffusion-3", "SD3"),
    ("stable-diffusion-v3", "SD3"),
    ("lumina", "Lumina"),
    ("hunyuan", "HunyuanDiT / HunyuanImage"),
    ("hidream", "HiDream"),
    ("qwen", "Qwen-Image"),
    ("stable-cascade", "Stable Cascade"),
    ("pixart", "PixArt"),
    ("z-image", "Z-Image"),
    ("wan", "Wan"),
)
"""``ss_base_model_version`` / ``modelspec.architecture`` prefixes of other families
(kohya ``library/sai_model_spec.py``, OneTrainer ``resources/sd_model_spec``; notes §5.1)."""
_SD12_ONLY = re.compile(r"down_blocks[._]0[._]attentions|input_blocks[._][12][._]1[._]")


def _group_infos(shapes: Mapping[str, Shape]) -> dict[str, ShapeInfo]:
    """Per module name, the delta shape its keys describe (modules that fail are skipped)."""
    groups, _ = group_keys(list(shapes))
    infos: dict[str, ShapeInfo] = {}
    for module, parts in groups.items():
        try:
            adapter = claim(set(parts))
            infos[module] = adapter.shape_info({p: tuple(shapes[k]) for p, k in parts.items()})
        except FormatError:
            continue
    return infos


def _key_votes(shapes: Mapping[str, Shape]) -> set[Architecture]:
    """Architectures the tensors point to (empty when they say nothing)."""
    names = list(shapes)
    # Names only SDXL has are decisive: its CLIP-L (te1) would otherwise vote SD1.
    if any(n.startswith(_SDXL_ONLY) for n in names):
        return {Architecture.SDXL}
    if any("label_emb" in n or "add_embedding" in n for n in names):
        return {Architecture.SDXL}
    if any(_DEEP_BLOCK.search(n) for n in names if not n.startswith(_FOREIGN_HINT)):
        return {Architecture.SDXL}
    votes: set[Architecture] = set()
    infos = _group_infos(shapes)
    for module, info in infos.items():
        if _CROSS_KV.search(module) and info.in_features in _CROSS_DIM:
            votes.add(_CROSS_DIM[info.in_features])
        if _TEXT_Q.search(module) and info.in_features in _TEXT_DIM:
            votes.add(_TEXT_DIM[info.in_features])
        layer = _TE_LAYER.search(module)
        if layer and int(layer[1]) >= 12:  # CLIP-L has 12 layers; OpenCLIP-H has 24
            votes.add(Architecture.SD2)
        if _PROJ_IN.search(module) and _SD12_ONLY.search(module):
            # Only SD1 uses 1×1 convs for proj_in/out; SD2 uses Linear.
            votes.add(Architecture.SD1 if info.kernel == (1, 1) else Architecture.SD2)
    return votes


def architecture_from_metadata(metadata: Mapping[str, str]) -> Architecture | None:
    """From kohya ``ss_base_model_version`` / ``ss_v2`` or ``modelspec.architecture``."""
    version = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
        return Architecture.SDXL
    if version.startswith("sd_v2") or spec.startswith("stable-diffusion-v2"):
        return Architecture.SD2
    if metadata.get("ss_v2") == "True":
        return Architecture.SD2
    if version.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
        return Architecture.SD1
    return None


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """Another model family named by the trainer's metadata (``flux1`` → Flux), else None."""
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(field, "").lower()
        for start, family in _FOREIGN_VERSIONS:
            if value.startswith(start):
                return family
    return None


def _pick_family(families: list[str], metadata: Mapping[str, str]) -> str:
    """One name for a file's foreign modules: Flux's own blocks beat SD3's (diffusers Flux
    also has ``add_q_proj``), then the metadata, then the generic prefix label."""
    for specific in ("Flux", "SD3"):
        if specific in families:
            return specific
    return family_from_metadata(metadata) or max(set(families), key=families.count)


def foreign_architecture(
    shapes: Mapping[str, Shape], metadata: Mapping[str, str] | None = None
) -> tuple[str, int, int] | None:
    """``(family, its modules, all modules)`` when the file is for a non-SD family.

    Decided by the keys (most module groups carry a Flux/SD3/… name: notes §5.2), or by the
    metadata when the keys name no SD UNet module. A kohya Flux file's CLIP-L part
    (``lora_te1_…``) is SD-looking, so the majority, not unanimity, decides.
    """
    groups, _ = group_keys(list(shapes))
    modules = [m for m in groups if not m.startswith("bundle_emb.")]
    families = [f for f in (foreign_family(m) for m in modules) if f is not None]
    if families and 2 * len(families) >= len(modules):
        return _pick_family(families, metadata or {}), len(families), len(modules)
    family = family_from_metadata(metadata or {})
    if family is not None and not any(m.startswith(("lora_unet_", "unet.")) for m in modules):
        return family, len(modules), len(modules)
    if family is not None and families:
        return family, len(families), len(modules)
    return None


def lora_architecture(
    shapes: Mapping[str, Shape], metadata: Mapping[str, str] | None = None
) -> Architecture | None:
    """The architecture a LoRA state dict targets, or ``None`` when undecidable.

    Args:
        shapes: every tensor key of the file → its shape (no tensor data needed).
        metadata: the safetensors ``__metadata__``.
    """
    votes = _key_votes(shapes)
    if len(votes) == 1:
        return next(iter(votes))
    if len(votes) > 1:
        return None
    return architecture_from_metadata(metadata or {})
