"""LoRA files, merge options and state snapshots shared by the host and WebUI tests.

The LoRAs are small random kohya files written by the engine's own writer (fitting selective
concept LoRAs with ``demo.build_demo_loras`` takes minutes on a shared CPU, and these tests
need files, not selectivity)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraclr_ext.files.metadata import LoraMetadata
from loraclr_ext.files.write import write_lora
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef

TEXT_LEAVES = ("layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj")
UNET_LEAVES = ("attn2.to_k", "attn2.to_v")


def random_lora(host, path: Path, trigger: str, seed: int, rank: int = 4) -> Path:
    """A kohya LoRA on ``host``'s attention layers with metadata trigger ``trigger``."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for ref in host.all_refs():
        if ref.path.endswith(TEXT_LEAVES + UNET_LEAVES):
            weight = host.base_weight(ref)
            out, inp = weight.shape
            up = torch.randn(out, rank, generator=gen) * 0.05
            down = torch.randn(rank, inp, generator=gen) * 0.05
            deltas[ref] = ModuleDelta(up, down, None)
    return write_lora(
        path,
        deltas,
        Architecture.SD1,
        LoraMetadata(title=trigger, triggers=[trigger]),
        overwrite=True,
        sidecar=False,
        check_shapes=False,
    )


def sdxl_lora(path: Path) -> Path:
    """A (tiny) SDXL LoRA: it targets the second text encoder, which SD1 does not have."""
    ref = ModuleRef("te2", "text_model.encoder.layers.0.self_attn.q_proj")
    delta = ModuleDelta(torch.ones(64, 2) * 0.01, torch.ones(2, 64) * 0.01, None)
    return write_lora(
        path,
        {ref: delta},
        Architecture.SDXL,
        LoraMetadata(triggers=["xlthing"]),
        overwrite=True,
        sidecar=False,
        check_shapes=False,
    )


FAST = {"steps": 1, "size": 64, "iterations": 0, "quality": False}
"""Merge options that keep a tiny CPU merge to a few seconds."""


def snapshot(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def fingerprint(model) -> tuple[str, str]:
    from loraclr_ext.hosts.weights import weights_fingerprint

    return (
        weights_fingerprint(model.model.diffusion_model),
        weights_fingerprint(model.cond_stage_model.wrapped.transformer),
    )


# ----------------------------------------------------------------------------- trainer layouts
#
# Files written the way each trainer or converter writes them (key names, tensor shapes,
# where the scale lives, the metadata it sets), from /work/notes/formats.md §1–§7. Each
# writer also returns the delta every module applies, computed here from the written
# tensors with the formulas of the notes (not with loraclr_ext's readers): ``[out, in·kh·kw]``
# fp32, scale folded in. Shapes come from :class:`Target`, so one writer serves the tiny
# test models (end-to-end merges) and the real module sizes (architecture detection).

TRIGGER_DIR = "10_sks dog"
"""kohya DreamBooth folder ``<repeats>_<class tokens>``: its trigger is ``sks dog``."""


@dataclass(frozen=True)
class Target:
    """One module a layout file covers.

    Attributes:
        ref: canonical name.
        out: output features / channels.
        inp: input features / channels.
        kernel: ``(kh, kw)`` for a conv, ``None`` for a Linear.
        base: the base weight ``[out, in·kh·kw]`` (what DoRA normalises).
    """

    ref: ModuleRef
    out: int
    inp: int
    kernel: tuple[int, int] | None
    base: torch.Tensor

    @property
    def flat_in(self) -> int:
        kh, kw = self.kernel or (1, 1)
        return self.inp * kh * kw


@dataclass
class Written:
    """What a layout writer put in a file: its tensors, metadata and every module's delta."""

    tensors: dict[str, torch.Tensor]
    expected: dict[ModuleRef, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


Writer = Callable[[list[Target], torch.Generator], Written]


@dataclass(frozen=True)
class Layout:
    """One on-disk layout: which modules it covers and how its trainer writes them.

    Attributes:
        name: test id.
        arch: the base model family it is for.
        leaves: module path endings it covers (text encoder and UNet).
        write: the writer.
        format: what ``inspect`` calls the format.
        triggers: the trigger words ``inspect`` finds in the file's metadata.
        note: a phrase of the note a merge reports for it (side parts, DoRA), or "".
        rank: the nominal rank ``inspect`` reports (``None``: an unfactored delta).
    """

    name: str
    arch: Architecture
    leaves: tuple[str, ...]
    write: Writer
    format: str
    triggers: tuple[str, ...] = ()
    note: str = ""
    rank: int | None = 4


def host_targets(host, leaves: tuple[str, ...]) -> list[Target]:
    """The modules of a (tiny) host whose path ends in one of ``leaves``."""
    refs = [ref for ref in host.all_refs() if ref.path.endswith(leaves)]
    modules = host.modules(refs)
    targets = []
    for ref in refs:
        weight = host.base_weight(ref).float()
        module = modules[ref]
        kernel = tuple(module.kernel_size) if isinstance(module, torch.nn.Conv2d) else None
        kh, kw = kernel or (1, 1)
        targets.append(Target(ref, weight.shape[0], weight.shape[1] // (kh * kw), kernel, weight))
    return targets


def real_targets(arch: Architecture, leaves: tuple[str, ...], seed: int = 0) -> list[Target]:
    """The first module per (component, leaf) at the real model's size, random base weights."""
    from loraclr_ext.model.naming import module_refs, module_spec

    gen = torch.Generator().manual_seed(seed)
    seen, targets = set(), []
    for ref in module_refs(arch):
        leaf = next((leaf for leaf in leaves if ref.path.endswith(leaf)), None)
        if leaf is None or (ref.component, leaf) in seen:
            continue
        seen.add((ref.component, leaf))
        spec = module_spec(ref, arch)
        kh, kw = spec.kernel or (1, 1)
        base = torch.randn(spec.out_features, spec.in_features * kh * kw, generator=gen) * 0.02
        targets.append(Target(ref, spec.out_features, spec.in_features, spec.kernel, base))
    return targets


# --- names ---------------------------------------------------------------------------------


def ldm_path(path: str) -> str:
    """The ldm / sgm name of a diffusers UNet path (SD1/SD2/SDXL share the block rule: two
    layers and a downsampler per down block, three layers and an upsampler per up block)."""
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3"}
    parts = path.split(".")
    if parts[0] == "mid_block":  # middle_block.0 / .1 / .2: resnet, attention, resnet
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        tail = parts[3:] if parts[1] == "attentions" else [resnet[parts[3]]]
        return ".".join(["middle_block", str(index), *tail])
    side, block, kind, layer = parts[0], int(parts[1]), parts[2], int(parts[3])
    rest = parts[4:]
    if side == "down_blocks":
        head = f"input_blocks.{1 + 3 * block + layer}"
    else:
        head = f"output_blocks.{3 * block + layer}"
    if kind == "attentions":
        return ".".join([head, "1", *rest])
    return ".".join([head, "0", resnet[rest[0]]])


def kohya_flat(target: Target, arch: Architecture, ldm: bool = False) -> str:
    """kohya sd-scripts ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` name."""
    ref = target.ref
    if ref.component == "unet":
        return "lora_unet_" + (ldm_path(ref.path) if ldm else ref.path).replace(".", "_")
    head = {"te1": "lora_te1_", "te2": "lora_te2_"}[ref.component]
    if arch is not Architecture.SDXL:
        head = "lora_te_"
    return head + ref.path.replace(".", "_")


def dotted(target: Target, unet: str, te1: str, te2: str = "", ldm: bool = False) -> str:
    """``<component prefix><dotted path>``, the UNet path in ldm form when ``ldm``."""
    ref = target.ref
    if ref.component == "unet":
        return unet + (ldm_path(ref.path) if ldm else ref.path)
    return (te1 if ref.component == "te1" else te2) + ref.path


# --- factors and their deltas --------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def lora_pair(
    target: Target, rank: int, gen: torch.Generator, flat: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) as kohya writes them: ``[r, in(, kh, kw)]``, ``[out, r(, 1, 1)]``;
    ``flat`` keeps a conv's down ``[r, in·kh·kw]`` and up ``[out, r]`` (ComfyUI's trainer)."""
    if target.kernel is None or flat:
        return _randn(gen, rank, target.flat_in), _randn(gen, target.out, rank)
    kh, kw = target.kernel
    return _randn(gen, rank, target.inp, kh, kw), _randn(gen, target.out, rank, 1, 1)


def lora_dense(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · up @ down`` with convs flattened ``[out, in·kh·kw]`` (kohya ``merge_to``)."""
    rank = down.shape[0]
    return scale * up.float().reshape(up.shape[0], rank) @ down.float().reshape(rank, -1)


def dora_applied(
    base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str, kernel
) -> torch.Tensor:
    """``W' − W`` as the WebUIs apply DoRA (notes §4.2): per input channel the norm of
    ``W + ΔW`` over (out, kh, kw) (A1111 / Forge); per output row the base row norm (Forge)."""
    w, d = base.double(), delta.double()
    k = kernel[0] * kernel[1] if kernel else 1
    if axis == "out":
        return (w + d) * (magnitude.double().reshape(-1, 1) / w.norm(dim=1, keepdim=True)) - w
    cube = (w + d).reshape(w.shape[0], -1, k)
    norms = cube.pow(2).sum(dim=(0, 2)).sqrt()
    scaled = cube * (magnitude.double().reshape(1, -1, 1) / norms.reshape(1, -1, 1))
    return scaled.reshape(w.shape) - w


def _kohya_meta(arch: Architecture, module: str, rank: int, alpha: float, **args) -> dict:
    """kohya sd-scripts metadata (train_network.py): network, base model, DreamBooth folder."""
    meta = {
        "ss_network_module": module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if arch is Architecture.SDXL else "sd_v1",
        "ss_dataset_dirs": json.dumps({TRIGGER_DIR: {"n_repeats": 10, "img_count": 12}}),
    }
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


# --- writers -------------------------------------------------------------------------------


def write_kohya(arch: Architecture, ldm: bool = False, dtype=torch.float16) -> Writer:
    """kohya sd-scripts LoRA / LoCon: fp16 factors (``save_precision``), ``alpha`` 3 at dim 4
    (an odd scale), 4-D conv factors; SDXL UNet names are sgm (``input_blocks_4_1_…``)."""

    def write(targets: list[Target], gen: torch.Generator) -> Written:
        tensors, expected = {}, {}
        for t in targets:
            name = kohya_flat(t, arch, ldm)
            down, up = (x.to(dtype) for x in lora_pair(t, 4, gen))
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
            tensors[f"{name}.alpha"] = torch.tensor(3.0, dtype=dtype)
            expected[t.ref] = lora_dense(down, up, 3 / 4)
        return Written(tensors, expected, _kohya_meta(arch, "networks.lora", 4, 3))

    return write


def write_locon_cp(targets: list[Target], gen: torch.Generator) -> Written:
    """LyCORIS LoCon with ``use_tucker``: a 3×3 conv as down ``[r, in, 1, 1]``, mid
    ``[r, r, 3, 3]``, up ``[out, r, 1, 1]``; Linear modules as plain pairs."""
    tensors, expected = {}, {}
    r = 4
    for t in targets:
        name = kohya_flat(t, Architecture.SD1)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
        if t.kernel is None:
            down, up = lora_pair(t, r, gen)
            expected[t.ref] = lora_dense(down, up, 2 / r)
        else:
            down, up = _randn(gen, r, t.inp, 1, 1), _randn(gen, t.out, r, 1, 1)
            mid = _randn(gen, r, r, *t.kernel)
            tensors[f"{name}.lora_mid.weight"] = mid
            # conv(x, down) then conv(., mid): the kernel of the pair is Σ_m mid[n, m] down[m, j]
            core = torch.einsum("nmkl,mj->njkl", mid, down.reshape(r, t.inp)).reshape(r, -1)
            expected[t.ref] = (2 / r) * up.reshape(t.out, r) @ core
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    meta = _kohya_meta(Architecture.SD1, "lycoris.kohya", r, 2, algo="locon", use_tucker=True)
    return Written(tensors, expected, meta)


def write_comfy_flat(targets: list[Target], gen: torch.Generator) -> Written:
    """ComfyUI's LoRA trainer: a conv's factors stored flattened, down ``[r, in·kh·kw]``,
    up ``[out, r]``; alpha = rank. No kohya metadata."""
    tensors, expected = {}, {}
    for t in targets:
        name = kohya_flat(t, Architecture.SD1)
        down, up = lora_pair(t, 4, gen, flat=True)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
        expected[t.ref] = lora_dense(down, up, 1.0)
    return Written(tensors, expected)


def write_loha(targets: list[Target], gen: torch.Generator) -> Written:
    """LyCORIS LoHa: ``(w1a @ w1b) ∘ (w2a @ w2b) · alpha / r``; a conv without Tucker keeps
    ``w?_b`` flattened ``[r, in·kh·kw]`` (the default), the second conv of a block uses the
    Tucker cores ``hada_t?`` ``[r, r, kh, kw]`` with ``w?_a [r, out]``, ``w?_b [r, in]``."""
    tensors, expected = {}, {}
    r = 4
    for t in targets:
        name = kohya_flat(t, Architecture.SD1)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
        if t.kernel is not None and t.ref.path.endswith("conv2"):
            ws = []
            for i in (1, 2):
                core = _randn(gen, r, r, *t.kernel, std=0.3)
                wa, wb = _randn(gen, r, t.out, std=0.3), _randn(gen, r, t.inp, std=0.3)
                tensors |= {
                    f"{name}.hada_t{i}": core,
                    f"{name}.hada_w{i}_a": wa,
                    f"{name}.hada_w{i}_b": wb,
                }
                ws.append(torch.einsum("pqkl,po,qi->oikl", core, wa, wb).reshape(t.out, -1))
        else:
            ws = []
            for i in (1, 2):
                wa, wb = _randn(gen, t.out, r, std=0.3), _randn(gen, r, t.flat_in, std=0.3)
                tensors |= {f"{name}.hada_w{i}_a": wa, f"{name}.hada_w{i}_b": wb}
                ws.append(wa @ wb)
        expected[t.ref] = ws[0] * ws[1] * (2 / r)
    meta = _kohya_meta(Architecture.SD1, "lycoris.kohya", r, 2, algo="loha")
    return Written(tensors, expected, meta)


def write_lokr(targets: list[Target], gen: torch.Generator) -> Written:
    """LyCORIS LoKr: ``kron(w1, w2) · alpha / r`` with a full ``lokr_w1 [4, 4]`` and
    ``w2 = lokr_w2_a @ lokr_w2_b``; a conv's ``lokr_w2_b`` is ``[r, in/4·kh·kw]``."""
    tensors, expected = {}, {}
    r = 2
    for t in targets:
        name = kohya_flat(t, Architecture.SD1)
        o2, i2 = t.out // 4, t.inp // 4
        w1 = _randn(gen, 4, 4, std=1.0)
        wa, wb = _randn(gen, o2, r), _randn(gen, r, i2 * t.flat_in // t.inp)
        tensors |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": wa, f"{name}.lokr_w2_b": wb}
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
        w2 = (wa @ wb).reshape(o2, i2, *(t.kernel or ()))
        w1x = w1.reshape(4, 4, *([1, 1] if t.kernel else []))
        expected[t.ref] = torch.kron(w1x, w2).reshape(t.out, -1) * (1 / r)
    meta = _kohya_meta(Architecture.SD1, "lycoris.kohya", r, 1, algo="lokr")
    return Written(tensors, expected, meta)


def write_full(targets: list[Target], gen: torch.Generator) -> Written:
    """LyCORIS full (``algo=full``): ``diff`` in the module's own shape and ``diff_b`` (a
    bias delta, a side part the merge lists and does not merge)."""
    tensors, expected = {}, {}
    for t in targets:
        name = kohya_flat(t, Architecture.SD1)
        diff = _randn(gen, t.out, t.inp, *(t.kernel or ()), std=0.02)
        tensors[f"{name}.diff"] = diff
        tensors[f"{name}.diff_b"] = _randn(gen, t.out, std=0.02)
        expected[t.ref] = diff.reshape(t.out, -1)
    return Written(
        tensors, expected, _kohya_meta(Architecture.SD1, "lycoris.kohya", 0, 0, algo="full")
    )


def write_dora(part: str, axis: str) -> Writer:
    """kohya-named DoRA: LyCORIS ``dora_scale`` ``[1, in]`` (≤ 3.1) or ``[out, 1]``
    (``wd_on_out``), or diffusers' kohya conversion of a PEFT DoRA,
    ``lora_magnitude_vector [out]``. Magnitudes near the norms they replace."""

    def write(targets: list[Target], gen: torch.Generator) -> Written:
        tensors, expected = {}, {}
        for t in targets:
            name = kohya_flat(t, Architecture.SD1)
            down, up = lora_pair(t, 2, gen)
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
            delta = lora_dense(down, up, 1.0)
            if axis == "in":
                norms = (t.base + delta).reshape(t.out, t.inp, -1).pow(2).sum(dim=(0, 2)).sqrt()
                shape = (1, t.inp)
            else:
                norms = t.base.norm(dim=1)
                shape = (t.out,) if part == "lora_magnitude_vector" else (t.out, 1)
            magnitude = (norms * (1 + 0.1 * torch.randn(norms.shape, generator=gen))).reshape(shape)
            tensors[f"{name}.{part}"] = magnitude
            expected[t.ref] = dora_applied(t.base, delta, magnitude, axis, t.kernel).float()
        meta = _kohya_meta(Architecture.SD1, "lycoris.kohya", 2, 2, algo="lora", dora_wd=True)
        return Written(tensors, expected, meta)

    return write


PEFT_METADATA = {
    "unet.r": 4,
    "unet.lora_alpha": 8,
    "text_encoder.r": 4,
    "text_encoder.lora_alpha": 2,
}


def write_peft(arch: Architecture) -> Writer:
    """diffusers ``save_lora_weights`` (current): ``unet.`` / ``text_encoder.`` /
    ``text_encoder_2.`` + ``lora_A`` / ``lora_B`` (a conv's A ``[r, in, kh, kw]``, B
    ``[out, r, 1, 1]``), alpha only in the header's ``lora_adapter_metadata``."""
    meta = dict(PEFT_METADATA)
    if arch is Architecture.SDXL:
        meta |= {"text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 4}
    scales = {"unet": 2.0, "te1": 0.5, "te2": 1.0}

    def write(targets: list[Target], gen: torch.Generator) -> Written:
        tensors, expected = {}, {}
        for t in targets:
            name = dotted(t, "unet.", "text_encoder.", "text_encoder_2.")
            down, up = lora_pair(t, 4, gen)
            tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
            expected[t.ref] = lora_dense(down, up, scales[t.ref.component])
        header = {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}
        return Written(tensors, expected, header)

    return write


def write_peft_raw(targets: list[Target], gen: torch.Generator) -> Written:
    """Raw PEFT ``save_pretrained`` of a wrapped UNet: ``base_model.model.<path>.lora_A.
    default.weight``; its alpha is in ``adapter_config.json``, absent here: scale 1."""
    tensors, expected = {}, {}
    for t in targets:
        name = f"base_model.model.{t.ref.path}"
        down, up = lora_pair(t, 4, gen)
        tensors |= {f"{name}.lora_A.default.weight": down, f"{name}.lora_B.default.weight": up}
        expected[t.ref] = lora_dense(down, up, 1.0)
    return Written(tensors, expected)


_OLD_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
_OLD_TEXT = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def write_diffusers_old(targets: list[Target], gen: torch.Generator) -> Written:
    """diffusers 0.14–0.20 training scripts: attention processors,
    ``unet.<attn>.processor.to_k_lora.down.weight`` and the text encoder's
    ``text_encoder.<layer>.self_attn.to_q_lora.down.weight``; no alpha (scale 1)."""
    tensors, expected = {}, {}
    for t in targets:
        attn, leaf = t.ref.path.rsplit(".", 1)
        if t.ref.component == "unet":
            if leaf == "0":  # to_out.0
                attn, leaf = attn.rsplit(".", 1)[0], "to_out.0"
            name = f"unet.{attn}.processor.{_OLD_UNET[leaf]}_lora"
        else:
            name = f"text_encoder.{attn}.{_OLD_TEXT[leaf]}_lora"
        down, up = lora_pair(t, 4, gen)
        tensors |= {f"{name}.down.weight": down, f"{name}.up.weight": up}
        expected[t.ref] = lora_dense(down, up, 1.0)
    return Written(tensors, expected)


def write_diffusers_021(targets: list[Target], gen: torch.Generator) -> Written:
    """diffusers 0.21–0.24 ``LoRACompatibleLinear``: ``unet.<path>.lora.down.weight``; the
    text encoder's ``text_encoder.<path>.lora_linear_layer.down.weight``; no alpha."""
    tensors, expected = {}, {}
    for t in targets:
        if t.ref.component == "unet":
            name, part = f"unet.{t.ref.path}", "lora"
        else:
            name, part = f"text_encoder.{t.ref.path}", "lora_linear_layer"
        down, up = lora_pair(t, 4, gen)
        tensors |= {f"{name}.{part}.down.weight": down, f"{name}.{part}.up.weight": up}
        expected[t.ref] = lora_dense(down, up, 1.0)
    return Written(tensors, expected)


def write_prefixed(
    unet: str, te1: str, te2: str = "", ldm: bool = False, peft_parts: bool = False
) -> Writer:
    """Dotted names under the given prefixes (OneTrainer OMI ``unet.<ldm>`` + ``clip_l.`` /
    ``clip_g.``; OneTrainer COMFY ``diffusion_model.<ldm>`` +
    ``text_encoders.clip_l.transformer.`` with ``lora_A``/``lora_B``; OneTrainer internal
    ``lora_unet.<diffusers path>``; Forge's state-dict names), ``alpha`` = rank / 2."""
    down_part, up_part = ("lora_A", "lora_B") if peft_parts else ("lora_down", "lora_up")

    def write(targets: list[Target], gen: torch.Generator) -> Written:
        tensors, expected = {}, {}
        for t in targets:
            name = dotted(t, unet, te1, te2, ldm)
            down, up = lora_pair(t, 4, gen)
            tensors |= {f"{name}.{down_part}.weight": down, f"{name}.{up_part}.weight": up}
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
            expected[t.ref] = lora_dense(down, up, 0.5)
        return Written(tensors, expected)

    return write


def write_simpletuner_lokr(targets: list[Target], gen: torch.Generator) -> Written:
    """SimpleTuner's LyCORIS wrapper on the diffusers UNet: ``lycoris_<path with _>`` LoKr
    (full ``lokr_w1``, factored ``w2``), ``lycoris_config`` in the header."""
    written = write_lokr(targets, gen)
    tensors = {"lycoris_" + k.removeprefix("lora_unet_"): v for k, v in written.tensors.items()}
    config = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1}
    return Written(tensors, written.expected, {"lycoris_config": json.dumps(config)})


def write_diffusers_kohya_export(targets: list[Target], gen: torch.Generator) -> Written:
    """diffusers ``convert_state_dict_to_kohya`` of an SD1 PEFT LoRA: ``lora_unet_`` and
    ``lora_te1_`` (even for SD1's only text encoder), ``alpha`` = the PEFT alpha."""
    tensors, expected = {}, {}
    for t in targets:
        ref = t.ref
        name = ("lora_unet_" if ref.component == "unet" else "lora_te1_") + ref.path.replace(
            ".", "_"
        )
        down, up = lora_pair(t, 4, gen)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        tensors[f"{name}.alpha"] = torch.tensor(8.0)
        expected[ref] = lora_dense(down, up, 2.0)
    return Written(tensors, expected)


# --- the table -----------------------------------------------------------------------------

SD1, SDXL = Architecture.SD1, Architecture.SDXL
TE = ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj")
ATTN = ("attn2.to_k", "attn1.to_q")
CONV = ("resnets.0.conv1", "resnets.0.conv2")
KOHYA = ("sks dog",)

LAYOUTS: tuple[Layout, ...] = (
    Layout("kohya", SD1, TE + ATTN, write_kohya(SD1), "lora", KOHYA),
    Layout(
        "kohya-sdxl-sgm",
        SDXL,
        TE + ATTN,
        write_kohya(SDXL, ldm=True, dtype=torch.bfloat16),
        "lora",
        KOHYA,
    ),
    Layout("locon", SD1, TE + ATTN + CONV, write_kohya(SD1), "locon", KOHYA),
    Layout("locon-cp", SD1, ATTN + CONV, write_locon_cp, "locon", KOHYA),
    Layout("comfy-flat-conv", SD1, ATTN + CONV, write_comfy_flat, "locon"),
    Layout("loha", SD1, TE + ATTN + CONV, write_loha, "loha", KOHYA),
    Layout("lokr", SD1, TE + ATTN + CONV, write_lokr, "lokr", KOHYA, rank=2),
    Layout(
        "full",
        SD1,
        TE + ATTN,
        write_full,
        "full",
        KOHYA,
        "side parts (bias / norm deltas) not merged",
        rank=None,
    ),
    Layout(
        "dora-in", SD1, TE + ATTN, write_dora("dora_scale", "in"), "lora+dora", KOHYA, "DoRA:", 2
    ),
    Layout("dora-out", SD1, ATTN, write_dora("dora_scale", "out"), "lora+dora", KOHYA, "DoRA:", 2),
    Layout(
        "peft-dora",
        SD1,
        ATTN,
        write_dora("lora_magnitude_vector", "out"),
        "lora+dora",
        KOHYA,
        "DoRA:",
        rank=2,
    ),
    Layout("peft", SD1, TE + ATTN + CONV, write_peft(SD1), "peft"),
    Layout("peft-sdxl", SDXL, TE + ATTN, write_peft(SDXL), "peft"),
    Layout("peft-raw", SD1, ATTN, write_peft_raw, "peft"),
    Layout("diffusers-0.14", SD1, TE + ATTN, write_diffusers_old, "peft"),
    Layout("diffusers-0.21", SD1, TE + ATTN, write_diffusers_021, "peft"),
    Layout("diffusers-kohya-export", SD1, TE + ATTN, write_diffusers_kohya_export, "lora"),
    Layout(
        "onetrainer-omi-sdxl",
        SDXL,
        TE + ATTN,
        write_prefixed("unet.", "clip_l.", "clip_g.", ldm=True),
        "lora",
    ),
    Layout(
        "onetrainer-comfy",
        SD1,
        TE + ATTN,
        write_prefixed(
            "diffusion_model.", "text_encoders.clip_l.transformer.", ldm=True, peft_parts=True
        ),
        "peft",
    ),
    Layout("onetrainer-internal", SD1, ATTN + CONV, write_prefixed("lora_unet.", ""), "locon"),
    Layout(
        "forge-names",
        SD1,
        TE + ATTN,
        write_prefixed("model.diffusion_model.", "clip_l.transformer.", ldm=True),
        "lora",
    ),
    Layout("simpletuner-lycoris", SD1, ATTN, write_simpletuner_lokr, "lokr", rank=2),
)
"""Every layout the reader supports, as its trainer writes it (README "LoRA files it reads")."""


def write_layout(layout: Layout, targets: list[Target], path: Path, seed: int) -> Written:
    """Write ``layout`` for ``targets`` to ``path``; returns what was written."""
    from safetensors.torch import save_file

    written = layout.write(targets, torch.Generator().manual_seed(seed))
    save_file({k: v.contiguous() for k, v in written.tensors.items()}, str(path), written.metadata)
    return written


# --- kinds that are refused by name --------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A file kind the merge refuses, as its writer lays it out (real SD1/SDXL/Flux sizes).

    Attributes:
        name: test id.
        tensors: key → shape of the tensors the writer stores.
        metadata: the header the writer sets.
        family: what ``inspect`` names as the architecture.
        reason: a phrase of the refusal.
        not_merged: what ``inspect`` lists as not merged (``None``: nothing listed).
        triggers: the trigger words ``inspect`` finds.
    """

    name: str
    tensors: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    family: str
    reason: str
    not_merged: str | None
    triggers: tuple[str, ...] = ()


def _pair_shapes(name: str, out: int, inp: int, rank: int = 4) -> dict[str, tuple[int, ...]]:
    return {f"{name}.lora_down.weight": (rank, inp), f"{name}.lora_up.weight": (out, rank)}


_SD1_TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
_SD1_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
_SD1_V = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
_SD1_LORA = _pair_shapes(_SD1_TE_Q, 768, 768) | _pair_shapes(_SD1_K, 320, 768)
_SD1_META = {"ss_base_model_version": "sd_v1", "ss_output_name": "castle"}
_XL_TE1_Q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
_XL_TE2_Q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"

REFUSED: tuple[Refused, ...] = (
    Refused(
        "bundle-a1111-ti",  # LyCORIS pack_bundle of an A1111 embedding: string_to_param.*
        _SD1_LORA | {"bundle_emb.qpr.string_to_param.*": (2, 768)},
        _SD1_META,
        "SD 1.x",
        "carries bundled embedding(s) 'qpr'",
        "1 bundled embeddings (qpr)",
        ("castle", "qpr"),
    ),
    Refused(
        "bundle-onetrainer-sdxl",  # OneTrainer: bundle_emb.<placeholder>.clip_l / .clip_g
        _pair_shapes(_XL_TE1_Q, 768, 768)
        | _pair_shapes(_XL_TE2_Q, 1280, 1280)
        | {"bundle_emb.<ohwx>.clip_l": (1, 768), "bundle_emb.<ohwx>.clip_g": (1, 1280)},
        {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
        "SDXL",
        "carries bundled embedding(s) '<ohwx>'",
        "1 bundled embeddings (<ohwx>)",
        ("<ohwx>",),
    ),
    Refused(
        "kohya-oft",  # sd-scripts networks/oft.py: oft_unet_ prefix, oft_blocks [n, bs, bs]
        {f"oft_unet_{_SD1_V}.oft_blocks": (4, 80, 80), f"oft_unet_{_SD1_V}.alpha": ()}
        | _pair_shapes(_SD1_K, 320, 768),
        _SD1_META,
        "SD 1.x",
        "uses OFT in 1 of 2 modules",
        "1 modules of an unsupported algorithm (OFT)",
        ("castle",),
    ),
    Refused(
        "lycoris-diag-oft",  # older LyCORIS diag-oft: oft_diag and rescale
        _SD1_LORA
        | {f"lora_unet_{_SD1_V}.oft_diag": (4, 80, 80), f"lora_unet_{_SD1_V}.rescale": (320, 1)},
        _SD1_META,
        "SD 1.x",
        "uses OFT in 1 of 3 modules",
        "1 modules of an unsupported algorithm (OFT)",
        ("castle",),
    ),
    Refused(
        "lycoris-boft",  # BOFT: 4-D oft_blocks
        _SD1_LORA | {f"lora_unet_{_SD1_V}.oft_blocks": (2, 4, 80, 80)},
        _SD1_META,
        "SD 1.x",
        "uses OFT in 1 of 3 modules",
        "1 modules of an unsupported algorithm (OFT)",
        ("castle",),
    ),
    Refused(
        "lycoris-ia3",  # (IA)^3: a [train_dim] weight and on_input
        _SD1_LORA | {f"lora_unet_{_SD1_V}.weight": (320,), f"lora_unet_{_SD1_V}.on_input": ()},
        _SD1_META,
        "SD 1.x",
        "uses IA3 in 1 of 3 modules",
        "1 modules of an unsupported algorithm (IA3)",
        ("castle",),
    ),
    Refused(
        "lycoris-glora",  # GLoRA: a1/a2/b1/b2
        _SD1_LORA
        | {
            f"lora_unet_{_SD1_V}.a1.weight": (4, 768),
            f"lora_unet_{_SD1_V}.a2.weight": (320, 4),
            f"lora_unet_{_SD1_V}.b1.weight": (4, 768),
            f"lora_unet_{_SD1_V}.b2.weight": (320, 4),
        },
        _SD1_META,
        "SD 1.x",
        "uses GLoRA in 1 of 3 modules",
        "1 modules of an unsupported algorithm (GLoRA)",
        ("castle",),
    ),
    Refused(
        "flux-kohya",  # sd-scripts networks/lora_flux.py
        _pair_shapes("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072)
        | _pair_shapes("lora_unet_single_blocks_0_linear1", 21504, 3072)
        | _pair_shapes(_XL_TE1_Q, 768, 768),
        {"ss_base_model_version": "flux1"},
        "Flux",
        "is a Flux LoRA (2 of 3 modules",
        None,
    ),
    Refused(
        "flux-diffusers",
        {
            "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": (4, 3072),
            "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": (12288, 4),
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (4, 3072),
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": (3072, 4),
        },
        {},
        "Flux",
        "is a Flux LoRA",
        None,
    ),
    Refused(
        "sd3-kohya",  # sd-scripts networks/lora_sd3.py
        _pair_shapes("lora_unet_joint_blocks_0_x_block_attn_qkv", 4608, 1536)
        | _pair_shapes("lora_unet_joint_blocks_0_context_block_mlp_fc1", 6144, 1536),
        {},
        "SD3",
        "is a SD3 LoRA",
        None,
    ),
    Refused(
        "sd3-diffusers",  # add_q_proj without single_transformer_blocks
        {
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (4, 1536),
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": (1536, 4),
        },
        {},
        "SD3",
        "is a SD3 LoRA",
        None,
    ),
    Refused(
        "t5-kohya",  # sd-scripts Flux / SD3 T5 encoder: lora_te3_
        _pair_shapes("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 4096, 4096),
        {},
        "Flux or SD3 (T5 encoder)",
        "is a Flux or SD3 (T5 encoder) LoRA",
        None,
    ),
    Refused(
        "onetrainer-dit",  # OneTrainer LEGACY for transformer models: lora_transformer_
        _pair_shapes("lora_transformer_transformer_blocks_0_attn_to_q", 3072, 3072),
        {},
        "DiT (Flux / SD3 …)",
        "is a DiT (Flux / SD3 …) LoRA",
        None,
    ),
    Refused(
        "simpletuner-dit",  # SimpleTuner's LyCORIS wrapper on a DiT: lycoris_transformer_
        {
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": (4, 4),
            "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": (768, 768),
        },
        {},
        "DiT (Flux / SD3 …)",
        "is a DiT (Flux / SD3 …) LoRA",
        None,
    ),
    Refused(
        "stable-cascade",
        _pair_shapes("lora_prior_unet_down_blocks_0_0_attention_attn_to_q", 2048, 2048),
        {},
        "Stable Cascade",
        "is a Stable Cascade LoRA",
        None,
    ),
)
"""Every kind refused by name (README "LoRA files it reads"), for ``inspect``."""


def write_refused(kind: Refused, path: Path) -> Path:
    """Write ``kind``'s tensors (small random values) and header to ``path``."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=gen) * 0.01 for k, shape in kind.tensors.items()}
    save_file(tensors, str(path), kind.metadata)
    return path
