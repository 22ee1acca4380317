"""Key ↔ module naming, kept as data.

Every module a LoRA may target is enumerated per architecture from a small layout table
(:class:`UNetLayout`, :class:`TextLayout`). All name lookups are dictionaries built from
that enumeration, so a file key is either an exact known name or unmatched — nothing is
guessed by splitting on underscores (module names themselves contain ``_``).

Three spellings are handled:

* **canonical** — :class:`~loraclr_ext.model.targets.ModuleRef` with the diffusers UNet path or
  the transformers-4 text path (``text_model.encoder.layers.N…``);
* **ldm / SGM** — the original Stable Diffusion UNet names (``input_blocks.4.1…``),
  see :func:`ldm_unet_path` and :func:`diffusers_unet_path`;
* **kohya** — ``lora_unet_…`` / ``lora_te_…`` / ``lora_te1_…`` / ``lora_te2_…`` with ``.``
  replaced by ``_``; SD1/SD2 files usually use diffusers UNet names and SDXL files ldm
  names, but both are accepted for every architecture.

Diffusers / PEFT keys (``unet.<path>``, ``text_encoder.<path>``, ``text_encoder_2.<path>``,
transformers-5 text paths without ``text_model.``) resolve through :func:`parse_module_name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.targets import Component, ModuleRef

Kernel = tuple[int, int] | None
Group = Literal["transformer", "locon", "embedding", "text"]
"""``transformer``: Linear / 1×1 conv inside a UNet ``Transformer2DModel`` (the modules a
plain kohya LoRA trains); ``locon``: resnet / down- / up-sampler convs and the resnet
time projection; ``embedding``: ``conv_in``, ``conv_out``, time and SDXL label embedding;
``text``: text-encoder attention and MLP Linears."""


@dataclass(frozen=True)
class ModuleSpec:
    """A target module and the shape of its weight in the base model.

    Attributes:
        ref: canonical name.
        in_features: input features (Linear) or input channels (conv).
        out_features: output features or channels.
        kernel: ``(kh, kw)`` for a conv, ``None`` for a Linear.
        group: see :data:`Group`.
    """

    ref: ModuleRef
    in_features: int
    out_features: int
    kernel: Kernel
    group: Group

    @property
    def flat_in(self) -> int:
        """``in·kh·kw``: the width of ``ModuleDelta.down`` for this module."""
        kh, kw = self.kernel or (1, 1)
        return self.in_features * kh * kw


@dataclass(frozen=True)
class UNetLayout:
    """The facts of a UNet needed to enumerate and rename its modules.

    Attributes:
        channels: ``block_out_channels``.
        down_depth: transformer blocks per attention in each down block (0 = no attention).
        up_depth: the same for each up block (up block ``i`` mirrors down block ``n-1-i``).
        mid_depth: transformer blocks in the mid attention.
        cross_dim: cross-attention context width (to_k / to_v input of ``attn2``).
        linear_proj: ``proj_in``/``proj_out`` are Linear (SD2, SDXL) rather than 1×1 convs.
        add_embedding_in: SDXL ``add_embedding.linear_1`` input width, else ``None``.
        layers_per_block: resnets per down block (up blocks have one more).
    """

    channels: tuple[int, ...]
    down_depth: tuple[int, ...]
    up_depth: tuple[int, ...]
    mid_depth: int
    cross_dim: int
    linear_proj: bool
    add_embedding_in: int | None = None
    layers_per_block: int = 2
    latent_channels: int = 4

    @property
    def time_dim(self) -> int:
        return 4 * self.channels[0]


@dataclass(frozen=True)
class TextLayout:
    """One CLIP-style text encoder: ``layers`` encoder layers of width ``hidden``."""

    component: Component
    layers: int
    hidden: int
    mlp: int


UNET_LAYOUTS: dict[Architecture, UNetLayout] = {
    Architecture.SD1: UNetLayout(
        channels=(320, 640, 1280, 1280),
        down_depth=(1, 1, 1, 0),
        up_depth=(0, 1, 1, 1),
        mid_depth=1,
        cross_dim=768,
        linear_proj=False,
    ),
    Architecture.SD2: UNetLayout(
        channels=(320, 640, 1280, 1280),
        down_depth=(1, 1, 1, 0),
        up_depth=(0, 1, 1, 1),
        mid_depth=1,
        cross_dim=1024,
        linear_proj=True,
    ),
    Architecture.SDXL: UNetLayout(
        channels=(320, 640, 1280),
        down_depth=(0, 2, 10),
        up_depth=(10, 2, 0),
        mid_depth=10,
        cross_dim=2048,
        linear_proj=True,
        add_embedding_in=2816,
    ),
}

# SD2's OpenCLIP-H has 24 layers in HF layout; the WebUIs use 23 (penultimate), but a
# LoRA trained in diffusers may touch all 24, so all are enumerated.
TEXT_LAYOUTS: dict[Architecture, tuple[TextLayout, ...]] = {
    Architecture.SD1: (TextLayout("te1", 12, 768, 3072),),
    Architecture.SD2: (TextLayout("te1", 24, 1024, 4096),),
    Architecture.SDXL: (TextLayout("te1", 12, 768, 3072), TextLayout("te2", 32, 1280, 5120)),
}

KOHYA_TEXT_PREFIX: dict[Architecture, dict[Component, str]] = {
    Architecture.SD1: {"te1": "lora_te"},
    Architecture.SD2: {"te1": "lora_te"},
    Architecture.SDXL: {"te1": "lora_te1", "te2": "lora_te2"},
}
KOHYA_UNET_PREFIX = "lora_unet"

_RESNET_TO_LDM: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_FROM_LDM: dict[str, str] = {v: k for k, v in _RESNET_TO_LDM.items()}

_TOP_TO_LDM: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_FROM_LDM: dict[str, str] = {v: k for k, v in _TOP_TO_LDM.items()}


# --------------------------------------------------------------------------- enumeration


def _transformer_specs(
    prefix: str, channels: int, depth: int, layout: UNetLayout
) -> list[ModuleSpec]:
    """Modules of one diffusers ``Transformer2DModel`` at ``prefix`` (inner dim = channels)."""
    c = channels
    proj_kernel: Kernel = None if layout.linear_proj else (1, 1)
    specs = [ModuleSpec(ModuleRef("unet", f"{prefix}.proj_in"), c, c, proj_kernel, "transformer")]
    for b in range(depth):
        tb = f"{prefix}.transformer_blocks.{b}"
        for attn, kv_in in (("attn1", c), ("attn2", layout.cross_dim)):
            for name, n_in in (("to_q", c), ("to_k", kv_in), ("to_v", kv_in), ("to_out.0", c)):
                specs.append(
                    ModuleSpec(
                        ModuleRef("unet", f"{tb}.{attn}.{name}"), n_in, c, None, "transformer"
                    )
                )
        # GEGLU: proj emits value and gate, 2 × 4c.
        specs.append(
            ModuleSpec(ModuleRef("unet", f"{tb}.ff.net.0.proj"), c, 8 * c, None, "transformer")
        )
        specs.append(ModuleSpec(ModuleRef("unet", f"{tb}.ff.net.2"), 4 * c, c, None, "transformer"))
    specs.append(
        ModuleSpec(ModuleRef("unet", f"{prefix}.proj_out"), c, c, proj_kernel, "transformer")
    )
    return specs


def _resnet_specs(prefix: str, c_in: int, c_out: int, time_dim: int) -> list[ModuleSpec]:
    """Modules of one diffusers ``ResnetBlock2D``."""
    specs = [
        ModuleSpec(ModuleRef("unet", f"{prefix}.conv1"), c_in, c_out, (3, 3), "locon"),
        ModuleSpec(ModuleRef("unet", f"{prefix}.time_emb_proj"), time_dim, c_out, None, "locon"),
        ModuleSpec(ModuleRef("unet", f"{prefix}.conv2"), c_out, c_out, (3, 3), "locon"),
    ]
    if c_in != c_out:
        specs.append(
            ModuleSpec(ModuleRef("unet", f"{prefix}.conv_shortcut"), c_in, c_out, (1, 1), "locon")
        )
    return specs


def _unet_specs(layout: UNetLayout) -> list[ModuleSpec]:
    """Every target module of a UNet, in diffusers ``named_modules`` order."""
    ch, t = layout.channels, layout.time_dim
    n = len(ch)
    specs = [
        ModuleSpec(ModuleRef("unet", "conv_in"), layout.latent_channels, ch[0], (3, 3), "embedding")
    ]
    specs.append(
        ModuleSpec(ModuleRef("unet", "time_embedding.linear_1"), ch[0], t, None, "embedding")
    )
    specs.append(ModuleSpec(ModuleRef("unet", "time_embedding.linear_2"), t, t, None, "embedding"))
    if layout.add_embedding_in is not None:
        specs.append(
            ModuleSpec(
                ModuleRef("unet", "add_embedding.linear_1"),
                layout.add_embedding_in,
                t,
                None,
                "embedding",
            )
        )
        specs.append(
            ModuleSpec(ModuleRef("unet", "add_embedding.linear_2"), t, t, None, "embedding")
        )

    prev = ch[0]
    for i in range(n):
        c = ch[i]
        for j in range(layout.layers_per_block):
            if layout.down_depth[i]:
                specs += _transformer_specs(
                    f"down_blocks.{i}.attentions.{j}", c, layout.down_depth[i], layout
                )
            specs += _resnet_specs(f"down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c, t)
        if i < n - 1:
            specs.append(
                ModuleSpec(
                    ModuleRef("unet", f"down_blocks.{i}.downsamplers.0.conv"), c, c, (3, 3), "locon"
                )
            )
        prev = c

    c = ch[-1]
    specs += _resnet_specs("mid_block.resnets.0", c, c, t)
    specs += _transformer_specs("mid_block.attentions.0", c, layout.mid_depth, layout)
    specs += _resnet_specs("mid_block.resnets.1", c, c, t)

    rev = tuple(reversed(ch))
    prev_out = rev[0]
    for i in range(n):
        c = rev[i]
        skip_in = rev[min(i + 1, n - 1)]
        n_layers = layout.layers_per_block + 1
        for j in range(n_layers):
            skip = skip_in if j == n_layers - 1 else c
            res_in = (prev_out if j == 0 else c) + skip
            if layout.up_depth[i]:
                specs += _transformer_specs(
                    f"up_blocks.{i}.attentions.{j}", c, layout.up_depth[i], layout
                )
            specs += _resnet_specs(f"up_blocks.{i}.resnets.{j}", res_in, c, t)
        if i < n - 1:
            specs.append(
                ModuleSpec(
                    ModuleRef("unet", f"up_blocks.{i}.upsamplers.0.conv"), c, c, (3, 3), "locon"
                )
            )
        prev_out = c

    specs.append(
        ModuleSpec(
            ModuleRef("unet", "conv_out"), ch[0], layout.latent_channels, (3, 3), "embedding"
        )
    )
    return specs


def _text_specs(text: TextLayout) -> list[ModuleSpec]:
    """Attention and MLP Linears of one CLIP text encoder (transformers-4 paths)."""
    h, m, comp = text.hidden, text.mlp, text.component
    specs: list[ModuleSpec] = []
    for k in range(text.layers):
        base = f"text_model.encoder.layers.{k}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs.append(
                ModuleSpec(ModuleRef(comp, f"{base}.self_attn.{proj}"), h, h, None, "text")
            )
        specs.append(ModuleSpec(ModuleRef(comp, f"{base}.mlp.fc1"), h, m, None, "text"))
        specs.append(ModuleSpec(ModuleRef(comp, f"{base}.mlp.fc2"), m, h, None, "text"))
    return specs


@cache
def module_specs(arch: Architecture) -> tuple[ModuleSpec, ...]:
    """Every module a LoRA for ``arch`` may target: text encoders first, then the UNet."""
    specs: list[ModuleSpec] = []
    for text in TEXT_LAYOUTS[arch]:
        specs += _text_specs(text)
    specs += _unet_specs(UNET_LAYOUTS[arch])
    return tuple(specs)


@cache
def _spec_index(arch: Architecture) -> dict[ModuleRef, ModuleSpec]:
    return {s.ref: s for s in module_specs(arch)}


def module_spec(ref: ModuleRef, arch: Architecture) -> ModuleSpec | None:
    """The spec of ``ref`` in ``arch``, or ``None`` if ``arch`` has no such module."""
    return _spec_index(arch).get(ref)


def module_refs(arch: Architecture, groups: tuple[Group, ...] | None = None) -> list[ModuleRef]:
    """Canonical names of ``arch``'s target modules, optionally only those in ``groups``."""
    return [s.ref for s in module_specs(arch) if groups is None or s.group in groups]


# ------------------------------------------------------------------ diffusers <-> ldm UNet

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(.*)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(.*)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(.*)")
_INPUT = re.compile(r"input_blocks\.(\d+)\.(\d+)(.*)")
_MIDDLE = re.compile(r"middle_block\.(\d+)(.*)")
_OUTPUT = re.compile(r"output_blocks\.(\d+)\.(\d+)(.*)")


def _bad_path(path: str, arch: Architecture, style: str) -> InvalidInputError:
    return InvalidInputError(
        f"'{path}' is not a {style} UNet path of a {arch.label} model; "
        "check that the checkpoint and the architecture match."
    )


def _split_leaf(rest: str, table: dict[str, str]) -> tuple[str, str] | None:
    """Split ``'.conv1.weight'`` into (``'conv1'``, ``'.weight'``) when its head is in ``table``."""
    body = rest.removeprefix(".")
    for name in sorted(table, key=len, reverse=True):
        if body == name or body.startswith(name + "."):
            return name, body[len(name) :]
    return None


def _resnet_rest_to_ldm(rest: str, path: str, arch: Architecture) -> str:
    split = _split_leaf(rest, _RESNET_TO_LDM)
    if split is None:
        raise _bad_path(path, arch, "diffusers")
    return "." + _RESNET_TO_LDM[split[0]] + split[1]


def _resnet_rest_from_ldm(rest: str, path: str, arch: Architecture) -> str:
    split = _split_leaf(rest, _RESNET_FROM_LDM)
    if split is None:
        raise _bad_path(path, arch, "ldm")
    return "." + _RESNET_FROM_LDM[split[0]] + split[1]


def ldm_unet_path(diffusers_path: str, arch: Architecture) -> str:
    """Map a diffusers ``UNet2DConditionModel`` path to the ldm/SGM (original SD) path.

    Works for module paths and parameter paths alike (any suffix such as ``.weight`` is
    kept), and for every parameter of the UNet, not only LoRA targets: transformer
    internals keep their names, resnet leaves are renamed (``conv1`` → ``in_layers.2``,
    ``conv2`` → ``out_layers.3``, ``time_emb_proj`` → ``emb_layers.1``, ``norm1`` →
    ``in_layers.0``, ``norm2`` → ``out_layers.0``, ``conv_shortcut`` → ``skip_connection``).

    Example: ``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in`` (SD1).

    Raises:
        InvalidInputError: the path is not part of ``arch``'s UNet.
    """
    layout = UNET_LAYOUTS[arch]
    stride = layout.layers_per_block + 1
    split = _split_leaf(diffusers_path, _TOP_TO_LDM)
    if split is not None:
        return _TOP_TO_LDM[split[0]] + split[1]
    if m := _DOWN.fullmatch(diffusers_path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if i >= len(layout.channels):
            raise _bad_path(diffusers_path, arch, "diffusers")
        if kind == "downsamplers":
            if (
                j != 0
                or i >= len(layout.channels) - 1
                or not (rest == ".conv" or rest.startswith(".conv."))
            ):
                raise _bad_path(diffusers_path, arch, "diffusers")
            return f"input_blocks.{stride * (i + 1)}.0.op{rest[len('.conv') :]}"
        if j >= layout.layers_per_block:
            raise _bad_path(diffusers_path, arch, "diffusers")
        block = f"input_blocks.{stride * i + j + 1}"
        if kind == "attentions":
            if not layout.down_depth[i]:
                raise _bad_path(diffusers_path, arch, "diffusers")
            return f"{block}.1{rest}"
        return f"{block}.0{_resnet_rest_to_ldm(rest, diffusers_path, arch)}"
    if m := _MID.fullmatch(diffusers_path):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions" and j == 0:
            return f"middle_block.1{rest}"
        if kind == "resnets" and j in (0, 1):
            return f"middle_block.{2 * j}{_resnet_rest_to_ldm(rest, diffusers_path, arch)}"
        raise _bad_path(diffusers_path, arch, "diffusers")
    if m := _UP.fullmatch(diffusers_path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n_layers = layout.layers_per_block + 1
        if i >= len(layout.channels):
            raise _bad_path(diffusers_path, arch, "diffusers")
        if kind == "upsamplers":
            if (
                j != 0
                or i >= len(layout.channels) - 1
                or not (rest == ".conv" or rest.startswith(".conv."))
            ):
                raise _bad_path(diffusers_path, arch, "diffusers")
            slot = 2 if layout.up_depth[i] else 1
            return f"output_blocks.{n_layers * i + n_layers - 1}.{slot}{rest}"
        if j >= n_layers:
            raise _bad_path(diffusers_path, arch, "diffusers")
        block = f"output_blocks.{n_layers * i + j}"
        if kind == "attentions":
            if not layout.up_depth[i]:
                raise _bad_path(diffusers_path, arch, "diffusers")
            return f"{block}.1{rest}"
        return f"{block}.0{_resnet_rest_to_ldm(rest, diffusers_path, arch)}"
    raise _bad_path(diffusers_path, arch, "diffusers")


def diffusers_unet_path(ldm_path: str, arch: Architecture) -> str:
    """Inverse of :func:`ldm_unet_path`: ldm/SGM UNet path → diffusers path.

    The path must be relative to the UNet (no ``model.diffusion_model.`` prefix).

    Raises:
        InvalidInputError: the path is not part of ``arch``'s UNet.
    """
    layout = UNET_LAYOUTS[arch]
    stride = layout.layers_per_block + 1
    n_blocks = len(layout.channels)
    split = _split_leaf(ldm_path, _TOP_FROM_LDM)
    if split is not None:
        return _TOP_FROM_LDM[split[0]] + split[1]
    if m := _INPUT.fullmatch(ldm_path):
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n - 1, stride)
        if n == 0 or i >= n_blocks:
            raise _bad_path(ldm_path, arch, "ldm")
        if j == stride - 1:  # the block's downsampler: input_blocks.{3(i+1)}.0.op
            if slot != 0 or i >= n_blocks - 1 or not (rest == ".op" or rest.startswith(".op.")):
                raise _bad_path(ldm_path, arch, "ldm")
            return f"down_blocks.{i}.downsamplers.0.conv{rest[len('.op') :]}"
        if slot == 1 and layout.down_depth[i]:
            return f"down_blocks.{i}.attentions.{j}{rest}"
        if slot == 0:
            return f"down_blocks.{i}.resnets.{j}{_resnet_rest_from_ldm(rest, ldm_path, arch)}"
        raise _bad_path(ldm_path, arch, "ldm")
    if m := _MIDDLE.fullmatch(ldm_path):
        k, rest = int(m[1]), m[2]
        if k == 1:
            return f"mid_block.attentions.0{rest}"
        if k in (0, 2):
            return f"mid_block.resnets.{k // 2}{_resnet_rest_from_ldm(rest, ldm_path, arch)}"
        raise _bad_path(ldm_path, arch, "ldm")
    if m := _OUTPUT.fullmatch(ldm_path):
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, stride)
        if i >= n_blocks:
            raise _bad_path(ldm_path, arch, "ldm")
        has_attn = bool(layout.up_depth[i])
        up_slot = 2 if has_attn else 1
        if slot == 0:
            return f"up_blocks.{i}.resnets.{j}{_resnet_rest_from_ldm(rest, ldm_path, arch)}"
        if slot == 1 and has_attn:
            return f"up_blocks.{i}.attentions.{j}{rest}"
        is_conv = rest == ".conv" or rest.startswith(".conv.")
        if slot == up_slot and j == stride - 1 and i < n_blocks - 1 and is_conv:
            return f"up_blocks.{i}.upsamplers.0{rest}"
        raise _bad_path(ldm_path, arch, "ldm")
    raise _bad_path(ldm_path, arch, "ldm")


# ------------------------------------------------------------------------- kohya names


def kohya_prefix(component: Component, arch: Architecture) -> str:
    """``lora_unet`` / ``lora_te`` (SD1, SD2) / ``lora_te1`` / ``lora_te2`` (SDXL)."""
    if component == "unet":
        return KOHYA_UNET_PREFIX
    try:
        return KOHYA_TEXT_PREFIX[arch][component]
    except KeyError:
        raise InvalidInputError(f"{arch.label} has no text encoder '{component}'.") from None


def _kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_name(ref: ModuleRef, arch: Architecture) -> str:
    """The kohya module name ``arch``'s files usually use for ``ref``.

    SD1/SD2 UNet modules keep diffusers names, SDXL UNet modules use ldm/SGM names:
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` (SD1),
    ``lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k`` (SDXL),
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (SD1/SD2 text encoder).
    """
    prefix = kohya_prefix(ref.component, arch)
    if ref.component == "unet" and arch is Architecture.SDXL:
        return _kohya(prefix, ldm_unet_path(ref.path, arch))
    return _kohya(prefix, ref.path)


@cache
def kohya_index(arch: Architecture) -> dict[str, ModuleRef]:
    """Every accepted kohya module name of ``arch`` → its canonical name.

    UNet modules are listed under both their diffusers-style and ldm-style names.
    """
    index: dict[str, ModuleRef] = {}
    for spec in module_specs(arch):
        ref = spec.ref
        prefix = kohya_prefix(ref.component, arch)
        index[_kohya(prefix, ref.path)] = ref
        if ref.component == "unet":
            index[_kohya(prefix, ldm_unet_path(ref.path, arch))] = ref
    return index


def parse_kohya_name(name: str, arch: Architecture) -> ModuleRef | None:
    """Canonical name of a kohya module name (no ``.lora_down.weight`` suffix), or ``None``."""
    return kohya_index(arch).get(name)


# ------------------------------------------------------------- diffusers / PEFT names

_DIFFUSERS_PREFIX: dict[str, Component] = {
    "unet.": "unet",
    "text_encoder.": "te1",
    "text_encoder_2.": "te2",
}
# Old diffusers attention-processor LoRAs: '<attn>.processor.to_q_lora' → '<attn>.to_q'.
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
# Old diffusers text-encoder LoRAs: 'self_attn.to_k_lora' → 'self_attn.k_proj'.
_TEXT_OLD = re.compile(r"\.self_attn\.to_(q|k|v|out)_lora$")


def _text_path(path: str) -> str:
    """transformers-5 drops the ``text_model.`` level; restore it (canonical is v4)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def parse_diffusers_name(name: str, arch: Architecture) -> ModuleRef | None:
    """Canonical name of a diffusers/PEFT module name such as ``unet.<path>``, or ``None``.

    Accepts ``unet.`` (diffusers or ldm UNet path), ``text_encoder.`` (→ ``te1``) and
    ``text_encoder_2.`` (→ ``te2``, SDXL only), with or without ``text_model.``, and the
    old diffusers spellings ``….processor.to_q_lora`` (UNet) and ``self_attn.to_q_lora``
    (text encoder).
    """
    for prefix, component in _DIFFUSERS_PREFIX.items():
        if not name.startswith(prefix):
            continue
        path = name[len(prefix) :]
        if component == "unet":
            path = _PROCESSOR.sub(lambda m: "." + (m[1] if m[1] != "to_out" else "to_out.0"), path)
            ref = ModuleRef("unet", path)
            if module_spec(ref, arch) is not None:
                return ref
            try:
                ref = ModuleRef("unet", diffusers_unet_path(path, arch))
            except InvalidInputError:
                return None
        else:
            path = _TEXT_OLD.sub(lambda m: f".self_attn.{m[1]}_proj", path)
            ref = ModuleRef(component, _text_path(path))
        return ref if module_spec(ref, arch) is not None else None
    return None


def parse_module_name(name: str, arch: Architecture) -> ModuleRef | None:
    """Canonical name of any supported module name (kohya or diffusers/PEFT), or ``None``."""
    if name.startswith("lora_"):
        return parse_kohya_name(name, arch)
    return parse_diffusers_name(name, arch)
