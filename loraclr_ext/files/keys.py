"""One table of the key prefixes LoRA trainers write, and key splitting that knows every part.

A tensor key is ``<prefix><module body>.<part>``. The prefix names the component
(UNet / first / second text encoder) or says the file is for another model family; the
body is a module path either *flat* (``.`` replaced by ``_``, kohya style) or *dotted*;
the part is the suffix a format uses (``lora_down.weight``, ``hada_w1_a``, ``alpha``…).

Sources for every row are in ``/work/notes/formats.md`` §1 (kohya sd-scripts
``networks/lora.py``, LyCORIS ``lycoris/wrapper.py``, OneTrainer ``convert_lora_util.py``,
diffusers ``loaders/lora_base.py`` / ``utils/state_dict_utils.py``, ComfyUI
``comfy/lora.py``). Spellings of one part are normalised here, once, so adapters see a
single name per part:

* PEFT adapter infix ``lora_A.default.weight`` → ``lora_A.weight``;
* diffusers ≤ 0.20 attention processors ``<attn>.processor.to_q_lora.down.weight`` →
  ``<attn>.to_q`` + ``lora.down.weight`` (``to_out_lora`` → ``to_out.0``; the text-encoder
  form ``self_attn.to_q_lora`` → ``self_attn.q_proj``, ``to_out_lora`` → ``out_proj``);
* PEFT DoRA ``lora_magnitude_vector(.weight)`` → ``lora_magnitude_vector``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.naming import kohya_prefix, parse_diffusers_name, parse_kohya_name
from loraclr_ext.model.targets import Component, ModuleRef

Style = Literal["flat", "dotted"]
Kind = Literal["component", "foreign", "embedding"]


@dataclass(frozen=True)
class Prefix:
    """One row of the prefix table.

    Attributes:
        text: the prefix as written (``lora_unet_``, ``clip_l.``…).
        kind: ``component`` (an SD component), ``foreign`` (another model family's part)
            or ``embedding`` (a bundled textual inversion).
        component: the SD component for ``kind == "component"``; ``None`` means "UNet or
            first text encoder, decided by the path" (raw PEFT ``base_model.model.``).
        style: ``flat`` (kohya ``_``-joined body) or ``dotted``.
        writer: who writes it (shown by ``inspect``).
        family: for ``foreign`` rows, the model family named to the user.
    """

    text: str
    kind: Kind
    component: Component | None
    style: Style
    writer: str
    family: str = ""


DIT = "DiT (Flux / SD3 …)"
"""The family named for DiT layouts that do not say which DiT (read as "x is a DiT … LoRA")."""

PREFIXES: tuple[Prefix, ...] = (
    # kohya-style flat names (notes §1.1)
    Prefix("lora_unet_", "component", "unet", "flat", "kohya / LyCORIS / OneTrainer"),
    Prefix("lora_te_", "component", "te1", "flat", "kohya / LyCORIS (SD1/SD2)"),
    Prefix("lora_te1_", "component", "te1", "flat", "kohya / LyCORIS (SDXL CLIP-L)"),
    Prefix("lora_te2_", "component", "te2", "flat", "kohya / LyCORIS (SDXL CLIP-G)"),
    Prefix("lycoris_", "component", "unet", "flat", "SimpleTuner / LyCORIS wrapper"),
    Prefix("oft_unet_", "component", "unet", "flat", "kohya OFT"),
    Prefix("lora_te3_", "foreign", None, "flat", "kohya (T5)", "Flux or SD3 (T5 encoder)"),
    Prefix("lora_transformer_", "foreign", None, "flat", "OneTrainer", DIT),
    # SimpleTuner's LyCORIS wrapper on a DiT: the wrapped module's own paths start with
    # transformer_blocks (a UNet's never do)
    Prefix("lycoris_transformer_", "foreign", None, "flat", "SimpleTuner / LyCORIS", DIT),
    Prefix("lora_prior_unet_", "foreign", None, "flat", "Stable Cascade", "Stable Cascade"),
    Prefix("lora_prior_te_", "foreign", None, "flat", "Stable Cascade", "Stable Cascade"),
    # dotted names (notes §1.2)
    Prefix("unet.", "component", "unet", "dotted", "diffusers / PEFT / OneTrainer"),
    Prefix("lora_unet.", "component", "unet", "dotted", "OneTrainer internal"),
    Prefix("text_encoder.", "component", "te1", "dotted", "diffusers / PEFT"),
    Prefix("text_encoder_2.", "component", "te2", "dotted", "diffusers / PEFT (SDXL)"),
    Prefix("clip_l.transformer.", "component", "te1", "dotted", "Forge state-dict names"),
    Prefix("clip_g.transformer.", "component", "te2", "dotted", "Forge state-dict names"),
    Prefix("clip_l.", "component", "te1", "dotted", "OneTrainer"),
    Prefix("clip_g.", "component", "te2", "dotted", "OneTrainer"),
    Prefix("text_encoders.clip_l.transformer.", "component", "te1", "dotted", "OneTrainer COMFY"),
    Prefix("text_encoders.clip_g.transformer.", "component", "te2", "dotted", "OneTrainer COMFY"),
    Prefix("model.diffusion_model.", "component", "unet", "dotted", "checkpoint-style names"),
    Prefix("diffusion_model.", "component", "unet", "dotted", "OneTrainer COMFY / ComfyUI"),
    Prefix("base_model.model.", "component", None, "dotted", "raw PEFT save_pretrained"),
    Prefix("transformer.", "foreign", None, "dotted", "diffusers DiT", DIT),
    Prefix("text_encoder_3.", "foreign", None, "dotted", "diffusers SD3", "SD3 (T5 encoder)"),
    Prefix("text_encoders.t5xxl.", "foreign", None, "dotted", "ComfyUI", "Flux or SD3 (T5)"),
    Prefix("bundle_emb.", "embedding", None, "dotted", "LyCORIS pack_bundle / OneTrainer"),
)
"""Longest match wins (see :func:`find_prefix`)."""

_BY_LENGTH = sorted(PREFIXES, key=lambda p: len(p.text), reverse=True)
_BARE_UNET = frozenset(
    {"down_blocks", "mid_block", "up_blocks", "input_blocks", "middle_block", "output_blocks"}
    | {"conv_in", "conv_out", "time_embedding"}
)
"""First path segments of a UNet module written with no component prefix."""
_BARE = Prefix("", "component", "unet", "dotted", "diffusers (no prefix)")

FOREIGN_BODIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:^|[._])(?:double_blocks|single_blocks)[._]\d"), "Flux"),
    (re.compile(r"single_transformer_blocks"), "Flux"),
    (re.compile(r"(?:^|[._])joint_blocks[._]\d"), "SD3"),
    (re.compile(r"(?:^|[._])context_embedder|(?:^|[._])x_embedder"), DIT),
    (re.compile(r"transformer_blocks[._]\d+[._](?:attn[._]add_[qkv]_proj|ff_context)"), "SD3"),
)
"""Module bodies only other families have (notes §5.2)."""


def find_prefix(module: str) -> tuple[Prefix, str] | None:
    """The table row a module name starts with and the body after it.

    Bare diffusers/ldm UNet paths (old attention-processor files without ``unet.``,
    OneTrainer ORIGINAL) count as UNet names.
    """
    for prefix in _BY_LENGTH:
        if module.startswith(prefix.text):
            return prefix, module[len(prefix.text) :]
    if module.split(".", 1)[0] in _BARE_UNET:
        return _BARE, module
    return None


def foreign_family(module: str) -> str | None:
    """The model family a module name belongs to when it is not SD1/SD2/SDXL, else ``None``."""
    for pattern, family in FOREIGN_BODIES:
        if pattern.search(module):
            return family
    found = find_prefix(module)
    if found is not None and found[0].kind == "foreign":
        return found[0].family
    return None


# ----------------------------------------------------------------------------- parts

LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
PEFT_PARTS = (
    "lora_A.weight",
    "lora_B.weight",
    "lora.down.weight",
    "lora.up.weight",
    "lora_linear_layer.down.weight",
    "lora_linear_layer.up.weight",
)
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
OTHER_PARTS = ("diff", "diff_b", "alpha", "scale", "dora_scale", "lora_magnitude_vector")
UNSUPPORTED: tuple[str, ...] = ("on_input", "oft_blocks", "oft_diag", "rescale", "w_norm", "b_norm")
UNSUPPORTED += ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")
BARE = ("weight", "bias")

PARTS: tuple[str, ...] = tuple(
    sorted(
        {*LORA_PARTS, *PEFT_PARTS, *LOHA_PARTS, *LOKR_PARTS, *OTHER_PARTS, *UNSUPPORTED, *BARE},
        key=len,
        reverse=True,
    )
)
"""Every part name (after normalisation), longest first so ``lora_A.weight`` beats ``weight``."""

_ADAPTER_INFIX = re.compile(r"\.(lora_[AB]|lora_magnitude_vector)\.default(\.weight)?$")
_OLD_PROCESSOR = re.compile(
    r"^(?P<mod>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight$"
)
_OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _old_processor(key: str) -> tuple[str, str] | None:
    """diffusers ≤ 0.20 ``…attn1.processor.to_q_lora.down.weight`` → (module, part)."""
    m = _OLD_PROCESSOR.match(key)
    if m is None:
        return None
    mod, proj = m["mod"], m["proj"]
    if mod.endswith("self_attn"):
        name = f"{mod}.{_OLD_TEXT[proj]}"
    else:
        name = f"{mod}.{'to_out.0' if proj == 'to_out' else proj}"
    return name, f"lora.{m['side']}.weight"


def split_key(key: str) -> tuple[str, str] | None:
    """``(module name, part)`` of a tensor key, with part spellings normalised; ``None``
    when the key ends in no known part (e.g. ``bundle_emb.x.string_to_param.*``)."""
    if key.startswith("bundle_emb."):
        return None
    old = _old_processor(key)
    if old is not None:
        return old
    key = _ADAPTER_INFIX.sub(lambda m: f".{m[1]}{m[2] or ''}", key)
    if key.endswith(".lora_magnitude_vector.weight"):
        key = key.removesuffix(".weight")
    for part in PARTS:
        if key.endswith("." + part) and len(key) > len(part) + 1:
            return key[: -len(part) - 1], part
    return None


def group_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group keys by module: ``{module: {part: original key}}`` and keys with no known part."""
    groups: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        split = split_key(key)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    return groups, unknown


# ----------------------------------------------------------------------------- resolving


def _dotted(component: Component, body: str, arch: Architecture) -> ModuleRef | None:
    head = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}[component]
    return parse_diffusers_name(head + body, arch)


def resolve_module(module: str, arch: Architecture) -> ModuleRef | None:
    """Canonical name of a file module name in any layout of :data:`PREFIXES`, or ``None``."""
    found = find_prefix(module)
    if found is None:
        return None
    prefix, body = found
    if prefix.kind != "component":
        return None
    if prefix.style == "flat":
        assert prefix.component is not None
        if prefix.component == "te2" and arch is not Architecture.SDXL:
            return None
        return parse_kohya_name(f"{kohya_prefix(prefix.component, arch)}_{body}", arch)
    if prefix.component is not None:
        return _dotted(prefix.component, body, arch)
    return _dotted("unet", body, arch) or _dotted("te1", body, arch)


def component_of(module: str) -> str:
    """A coarse component label of a file module (``unet``/``te1``/``te2``/``embedding``/
    a foreign family/``unknown``) without resolving it against an architecture."""
    family = foreign_family(module)
    if family is not None:
        return family
    found = find_prefix(module)
    if found is None:
        return "unknown"
    prefix, body = found
    if prefix.kind == "embedding":
        return "embedding"
    if prefix.component is None:
        return "te1" if body.startswith(("text_model.", "encoder.")) else "unet"
    return prefix.component
