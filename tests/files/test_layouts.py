"""Every on-disk layout trainers write, each file built the way that trainer writes it, read
into deltas and compared with an independent computation of ``ΔW`` (fp32, rel. error < 1e-5).

Layout sources: /work/notes/formats.md §1–§6 (kohya sd-scripts, LyCORIS, OneTrainer,
SimpleTuner, diffusers/PEFT, ComfyUI). Real SD1/SDXL module sizes, small ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from loraclr_ext.errors import ArchitectureMismatchError, UnmatchedKeysError
from loraclr_ext.files.keys import split_key
from loraclr_ext.files.read import describe_lora, precheck_lora, read_lora
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.targets import ModuleRef

SD1, SDXL = Architecture.SD1, Architecture.SDXL
CONV1 = ModuleRef("unet", "down_blocks.0.resnets.0.conv1")  # SD1: 320 -> 320, 3x3
ATTN1_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # 640 -> 640
ATTN2_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # SD1: 768 -> 320
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
XL_K = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"  # SDXL: 2048 -> 640


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rnd(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- flattened conv


def test_flattened_lora_conv_takes_the_module_kernel(tmp_path: Path) -> None:
    """ComfyUI's trainer: a 3x3 conv as lora_down [r, in*9], lora_up [out, r]."""
    g = gen(0)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    down, up = rnd(g, 4, 320 * 9), rnd(g, 320, 4)
    t = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    t[f"{name}.alpha"] = torch.tensor(2.0)
    lf = read_lora(save(tmp_path / "flat.safetensors", t))
    d = lf.deltas[CONV1]
    assert d.kernel == (3, 3)
    assert lf.format == "locon"
    # Independent: the two-step convolution a 1x1-after-3x3 LoRA computes.
    x = rnd(g, 1, 320, 6, 6)
    ref = 0.5 * F.conv2d(F.conv2d(x, down.reshape(4, 320, 3, 3), padding=1), up[:, :, None, None])
    got = F.conv2d(x, d.dense().reshape(320, 320, 3, 3), padding=1)
    assert rel(got, ref) < 1e-5
    info = describe_lora(tmp_path / "flat.safetensors")
    assert info.format == "locon" and info.usable


def test_flattened_loha_and_lokr_conv_lycoris_default_layout(tmp_path: Path) -> None:
    """LyCORIS without Tucker: hada_w?_b [r, in*9] and lokr_w2_b [r, d*9] (loha.py/lokr.py)."""
    g = gen(1)
    loha = "lora_unet_down_blocks_0_resnets_0_conv1"
    lokr = "lora_unet_down_blocks_0_resnets_0_conv2"
    r = 2
    t = {
        f"{loha}.hada_w1_a": rnd(g, 320, r),
        f"{loha}.hada_w1_b": rnd(g, r, 320 * 9),
        f"{loha}.hada_w2_a": rnd(g, 320, r),
        f"{loha}.hada_w2_b": rnd(g, r, 320 * 9),
        f"{loha}.alpha": torch.tensor(1.0),
        # 320 = 4*80 out, 320 = 4*80 in; w2 = a [80, r] @ b [r, 80*9]
        f"{lokr}.lokr_w1": rnd(g, 4, 4),
        f"{lokr}.lokr_w2_a": rnd(g, 80, r),
        f"{lokr}.lokr_w2_b": rnd(g, r, 80 * 9),
        f"{lokr}.alpha": torch.tensor(1.0),
    }
    lf = read_lora(save(tmp_path / "lyco.safetensors", t))
    w1 = t[f"{loha}.hada_w1_a"] @ t[f"{loha}.hada_w1_b"]
    w2 = t[f"{loha}.hada_w2_a"] @ t[f"{loha}.hada_w2_b"]
    d = lf.deltas[CONV1]
    assert d.kernel == (3, 3)
    assert rel(d.dense(), w1 * w2 * (1.0 / r)) < 1e-5
    w2k = (t[f"{lokr}.lokr_w2_a"] @ t[f"{lokr}.lokr_w2_b"]).reshape(80, 80, 3, 3)
    conv = torch.kron(t[f"{lokr}.lokr_w1"][:, :, None, None], w2k) * (1.0 / r)
    d2 = lf.deltas[ModuleRef("unet", "down_blocks.0.resnets.0.conv2")]
    assert d2.kernel == (3, 3)
    assert rel(d2.dense(), conv.reshape(320, -1)) < 1e-5


def test_flattened_conv_of_wrong_size_is_refused_when_read(tmp_path: Path) -> None:
    g = gen(2)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    t = {f"{name}.lora_down.weight": rnd(g, 2, 320 * 4), f"{name}.lora_up.weight": rnd(g, 320, 2)}
    t |= {
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight": rnd(g, 2, 320, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_up.weight": rnd(g, 320, 2, 1, 1),
    }
    path = save(tmp_path / "bad.safetensors", t)
    with pytest.raises(UnmatchedKeysError, match=r"flattened delta \[320, 1280\] does not fit"):
        read_lora(path, arch_hint=SD1)


# ----------------------------------------------------------------------------- PEFT scale


def test_peft_alpha_from_header_metadata(tmp_path: Path) -> None:
    """diffusers save_lora_weights(..., unet_lora_adapter_metadata=...): no alpha tensors."""
    g = gen(3)
    q2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    t = {
        f"unet.{ATTN1_Q}.lora_A.weight": rnd(g, 4, 640),
        f"unet.{ATTN1_Q}.lora_B.weight": rnd(g, 640, 4),
        f"unet.{q2}.lora_A.weight": rnd(g, 8, 640),
        f"unet.{q2}.lora_B.weight": rnd(g, 640, 8),
        f"text_encoder.{TE_Q}.lora_A.weight": rnd(g, 4, 768),
        f"text_encoder.{TE_Q}.lora_B.weight": rnd(g, 768, 4),
    }
    meta = {
        "unet.r": 4,
        "unet.lora_alpha": 16,
        "unet.rank_pattern": {"attn1.to_k": 8},
        "unet.alpha_pattern": {"attn1.to_k": 4},
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 8,
        "text_encoder.use_rslora": True,
    }
    path = save(tmp_path / "peft.safetensors", t, {"lora_adapter_metadata": json.dumps(meta)})
    lf = read_lora(path, arch_hint=SD1)
    expect = {
        ModuleRef("unet", ATTN1_Q): 16 / 4,
        ModuleRef("unet", q2): 4 / 8,  # per-module patterns
        ModuleRef("te1", TE_Q): 8 / 2,  # rsLoRA: alpha / sqrt(r)
    }
    prefixes = {"unet": "unet.", "te1": "text_encoder."}
    for ref, scale in expect.items():
        key = prefixes[ref.component] + ref.path
        dense = t[f"{key}.lora_B.weight"] @ t[f"{key}.lora_A.weight"]
        assert rel(lf.deltas[ref].dense(), scale * dense) < 1e-5, ref


def test_peft_without_metadata_is_scale_one_and_default_adapter_infix(tmp_path: Path) -> None:
    """Raw PEFT save_pretrained: base_model.model.<path>.lora_A.default.weight."""
    g = gen(4)
    t = {
        f"base_model.model.{ATTN1_Q}.lora_A.default.weight": rnd(g, 2, 640),
        f"base_model.model.{ATTN1_Q}.lora_B.default.weight": rnd(g, 640, 2),
    }
    lf = read_lora(save(tmp_path / "raw.safetensors", t), arch_hint=SD1)
    dense = (
        t[f"base_model.model.{ATTN1_Q}.lora_B.default.weight"]
        @ (t[f"base_model.model.{ATTN1_Q}.lora_A.default.weight"])
    )
    assert rel(lf.deltas[ModuleRef("unet", ATTN1_Q)].dense(), dense) < 1e-5


# ----------------------------------------------------------------------------- old diffusers


@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_old_attention_processor_names(tmp_path: Path, prefix: str) -> None:
    """diffusers 0.14–0.20 train_dreambooth_lora: <attn>.processor.to_q_lora.down.weight."""
    g = gen(5)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    t = {}
    for proj, inp in (("to_q", 320), ("to_k", 768), ("to_out", 320)):
        t[f"{prefix}{attn}.processor.{proj}_lora.down.weight"] = rnd(g, 4, inp)
        t[f"{prefix}{attn}.processor.{proj}_lora.up.weight"] = rnd(g, 320, 4)
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    t[f"{te}.to_k_lora.down.weight"] = rnd(g, 4, 768)
    t[f"{te}.to_k_lora.up.weight"] = rnd(g, 768, 4)
    lf = read_lora(save(tmp_path / "old.safetensors", t))
    assert lf.architecture is SD1 and lf.unmatched == []
    targets = {"to_q": "to_q", "to_k": "to_k", "to_out": "to_out.0"}
    for proj, path in targets.items():
        key = f"{prefix}{attn}.processor.{proj}_lora"
        dense = t[f"{key}.up.weight"] @ t[f"{key}.down.weight"]
        assert rel(lf.deltas[ModuleRef("unet", f"{attn}.{path}")].dense(), dense) < 1e-5
    te_ref = ModuleRef("te1", "text_model.encoder.layers.0.self_attn.k_proj")
    dense = t[f"{te}.to_k_lora.up.weight"] @ t[f"{te}.to_k_lora.down.weight"]
    assert rel(lf.deltas[te_ref].dense(), dense) < 1e-5


# ----------------------------------------------------------------------------- OneTrainer


def _ot_sdxl(g: torch.Generator, with_clip_g: bool) -> dict[str, torch.Tensor]:
    """OneTrainer OMI layout: unet.<ldm path>, clip_l./clip_g. + transformers path."""
    t = {
        "unet.input_blocks.4.1.transformer_blocks.1.attn2.to_k.lora_down.weight": rnd(g, 2, 2048),
        "unet.input_blocks.4.1.transformer_blocks.1.attn2.to_k.lora_up.weight": rnd(g, 640, 2),
        "unet.input_blocks.4.1.transformer_blocks.1.attn2.to_k.alpha": torch.tensor(1.0),
        f"clip_l.{TE_Q}.lora_down.weight": rnd(g, 2, 768),
        f"clip_l.{TE_Q}.lora_up.weight": rnd(g, 768, 2),
        f"clip_l.{TE_Q}.alpha": torch.tensor(4.0),
    }
    if with_clip_g:
        t[f"clip_g.{TE_Q}.lora_down.weight"] = rnd(g, 2, 1280)
        t[f"clip_g.{TE_Q}.lora_up.weight"] = rnd(g, 1280, 2)
    return t


@pytest.mark.parametrize("with_clip_g", [False, True])
def test_onetrainer_unet_ldm_and_clip_prefixes(tmp_path: Path, with_clip_g: bool) -> None:
    t = _ot_sdxl(gen(6), with_clip_g)
    lf = read_lora(save(tmp_path / "ot.safetensors", t), arch_hint=SDXL)
    assert lf.unmatched == []
    assert {r.component for r in lf.deltas} == {"unet", "te1"} | ({"te2"} if with_clip_g else set())
    k = "unet.input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    assert (
        rel(
            lf.deltas[ModuleRef("unet", XL_K)].dense(),
            0.5 * t[f"{k}.lora_up.weight"] @ t[f"{k}.lora_down.weight"],
        )
        < 1e-5
    )
    q = f"clip_l.{TE_Q}"
    expected = 2.0 * t[f"{q}.lora_up.weight"] @ t[f"{q}.lora_down.weight"]
    assert rel(lf.deltas[ModuleRef("te1", TE_Q)].dense(), expected) < 1e-5
    if with_clip_g:
        q = f"clip_g.{TE_Q}"
        expected = t[f"{q}.lora_up.weight"] @ t[f"{q}.lora_down.weight"]
        assert rel(lf.deltas[ModuleRef("te2", TE_Q)].dense(), expected) < 1e-5


def test_onetrainer_comfy_and_diffusion_model_prefixes(tmp_path: Path) -> None:
    """OneTrainer COMFY: diffusion_model.<ldm> + text_encoders.clip_l.transformer.<path>."""
    g = gen(7)
    unet = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # SD1 attn2 K
    te = f"text_encoders.clip_l.transformer.{TE_Q}"
    t = {
        f"{unet}.lora_A.weight": rnd(g, 2, 768),
        f"{unet}.lora_B.weight": rnd(g, 320, 2),
        f"{te}.lora_A.weight": rnd(g, 2, 768),
        f"{te}.lora_B.weight": rnd(g, 768, 2),
        f"{te}.alpha": torch.tensor(1.0),
    }
    lf = read_lora(save(tmp_path / "comfy.safetensors", t), arch_hint=SD1)
    d_unet = t[f"{unet}.lora_B.weight"] @ t[f"{unet}.lora_A.weight"]
    assert rel(lf.deltas[ModuleRef("unet", ATTN2_K)].dense(), d_unet) < 1e-5
    d_te = 0.5 * t[f"{te}.lora_B.weight"] @ t[f"{te}.lora_A.weight"]
    assert rel(lf.deltas[ModuleRef("te1", TE_Q)].dense(), d_te) < 1e-5


# ----------------------------------------------------------------------------- SimpleTuner


def test_simpletuner_lycoris_prefix_equals_the_kohya_names(tmp_path: Path) -> None:
    g = gen(8)
    body = "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    parts = {
        "lokr_w1": rnd(g, 8, 8),
        "lokr_w2_a": rnd(g, 80, 2),
        "lokr_w2_b": rnd(g, 2, 80),
        "alpha": torch.tensor(1.0),
    }
    lyco = read_lora(
        save(tmp_path / "st.safetensors", {f"lycoris_{body}.{p}": v for p, v in parts.items()}),
        arch_hint=SD1,
    )
    kohya = read_lora(
        save(tmp_path / "k.safetensors", {f"lora_unet_{body}.{p}": v for p, v in parts.items()}),
        arch_hint=SD1,
    )
    ref = ModuleRef("unet", ATTN1_Q)
    w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    expected = torch.kron(parts["lokr_w1"], w2) * 0.5
    assert rel(lyco.deltas[ref].dense(), expected) < 1e-5
    assert rel(lyco.deltas[ref].dense(), kohya.deltas[ref].dense()) < 1e-6


# ----------------------------------------------------------------------------- refused kinds


def _kohya_pair(g: torch.Generator, name: str, out: int, inp: int) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": rnd(g, 2, inp), f"{name}.lora_up.weight": rnd(g, out, 2)}


SD1_TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
SD1_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def test_bundled_embedding_is_refused_by_name_and_listed_as_trigger(tmp_path: Path) -> None:
    g = gen(9)
    t = _kohya_pair(g, SD1_TE_Q, 768, 768) | _kohya_pair(g, SD1_K, 320, 768)
    t["bundle_emb.qpr.string_to_param.*"] = rnd(g, 2, 768)
    path = save(tmp_path / "piv.safetensors", t)
    with pytest.raises(UnmatchedKeysError, match=r"bundled embedding\(s\) 'qpr'"):
        read_lora(path)
    with pytest.raises(UnmatchedKeysError, match="'qpr'"):
        precheck_lora(path)  # before any model loads
    info = describe_lora(path)
    assert "qpr" in info.triggers
    assert "1 bundled embeddings (qpr)" in info.not_merged


def _a1111_per_input(w: torch.Tensor, dw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A1111 network.py apply_weight_decompose, written out: norm per input channel of
    W + ΔW over (out, kh, kw); returns W' − W. ``w``/``dw`` in the module's own shape."""
    calc = w + dw
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1)
    shape = [1, calc.shape[1]] + [1] * (calc.dim() - 2)
    return calc * (scale.reshape(shape) / norm.reshape(shape)) - w


def _forge_per_output(w: torch.Tensor, dw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Forge backend/patcher/lora.py (ComfyUI weight_decompose), output axis: the row norm
    of the base weight W; returns W' − W."""
    norm = w.reshape(w.shape[0], -1).norm(dim=1)
    shape = [w.shape[0]] + [1] * (w.dim() - 1)
    return (w + dw) * (scale.reshape(shape) / norm.reshape(shape)) - w


@pytest.mark.parametrize(
    ("part", "shape", "axis"),
    [
        ("dora_scale", (1, 768), "in"),  # LyCORIS <= 3.1 / wd_on_output=False / OneTrainer
        ("dora_scale", (320, 1), "out"),  # LyCORIS >= 3.2 wd_on_out (default)
        ("lora_magnitude_vector", (320,), "out"),  # PEFT via diffusers' kohya conversion
    ],
)
def test_dora_linear_is_baked_as_the_webuis_apply_it(tmp_path, part: str, shape, axis) -> None:
    g = gen(10)
    t = _kohya_pair(g, SD1_K, 320, 768)
    t[f"{SD1_K}.alpha"] = torch.tensor(1.0)
    w = rnd(g, 320, 768) * 0.05
    dw = 0.5 * t[f"{SD1_K}.lora_up.weight"] @ t[f"{SD1_K}.lora_down.weight"] * 0.01
    t[f"{SD1_K}.lora_up.weight"] *= 0.01
    norms = (w + dw).norm(dim=0) if axis == "in" else w.norm(dim=1)
    t[f"{SD1_K}.{part}"] = (norms * (1 + 0.2 * rnd(g, norms.numel()))).reshape(shape)
    path = save(tmp_path / "dora.safetensors", t)
    with pytest.raises(UnmatchedKeysError, match=r"uses DoRA in 1 of 1 modules; DoRA needs"):
        read_lora(path)  # no base weights: refused by name, not read as a plain LoRA
    assert precheck_lora(path) is True
    ref = ModuleRef("unet", ATTN2_K)
    lf = read_lora(path, base_weight=lambda r: w if r == ref else None)
    independent = (_a1111_per_input if axis == "in" else _forge_per_output)(
        w.double(), dw.double(), t[f"{SD1_K}.{part}"].double()
    )
    assert rel(lf.deltas[ref].dense().double(), independent) < 1e-5
    assert lf.format == "lora+dora"
    assert lf.notes[0].startswith("DoRA: 1 modules baked exactly")


def test_dora_conv_per_input_and_peft_conv_magnitude(tmp_path: Path) -> None:
    g = gen(15)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    conv2 = "lora_unet_down_blocks_0_resnets_0_conv2"
    w1, w2 = rnd(g, 320, 320, 3, 3) * 0.02, rnd(g, 320, 320, 3, 3) * 0.02
    t = {
        f"{name}.lora_down.weight": rnd(g, 2, 320, 3, 3) * 0.05,
        f"{name}.lora_up.weight": rnd(g, 320, 2, 1, 1) * 0.05,
        f"{conv2}.lora_down.weight": rnd(g, 2, 320, 3, 3) * 0.05,
        f"{conv2}.lora_up.weight": rnd(g, 320, 2, 1, 1) * 0.05,
    }
    t[f"{name}.dora_scale"] = rnd(g, 1, 320, 1, 1).abs() + 0.5  # per input channel
    t[f"{conv2}.lora_magnitude_vector"] = rnd(g, 1, 320, 1, 1).abs() + 0.5  # PEFT conv: out
    refs = {CONV1: w1, ModuleRef("unet", "down_blocks.0.resnets.0.conv2"): w2}
    lf = read_lora(
        save(tmp_path / "dc.safetensors", t), base_weight=lambda r: refs[r].reshape(320, -1)
    )
    for module, ref, fn, part in (
        (name, CONV1, _a1111_per_input, "dora_scale"),
        (
            conv2,
            ModuleRef("unet", "down_blocks.0.resnets.0.conv2"),
            _forge_per_output,
            "lora_magnitude_vector",
        ),
    ):
        up, down = t[f"{module}.lora_up.weight"], t[f"{module}.lora_down.weight"]
        dw = (up.reshape(320, 2) @ down.reshape(2, -1)).reshape(320, 320, 3, 3)
        expected = fn(refs[ref].double(), dw.double(), t[f"{module}.{part}"].double())
        d = lf.deltas[ref]
        assert d.kernel == (3, 3)
        assert rel(d.dense().double(), expected.reshape(320, -1)) < 1e-5


def test_oft_is_refused_by_name_with_module_counts(tmp_path: Path) -> None:
    g = gen(16)
    t = _kohya_pair(g, SD1_TE_Q, 768, 768) | _kohya_pair(g, SD1_K, 320, 768)
    t["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.oft_blocks"] = rnd(
        g, 4, 80, 80
    )
    path = save(tmp_path / "oft.safetensors", t)
    with pytest.raises(UnmatchedKeysError, match=r"uses OFT in 1 of 3 modules; OFT is not"):
        precheck_lora(path)


def test_kohya_flux_file_is_named_flux_not_sdxl(tmp_path: Path) -> None:
    """kohya networks/lora_flux.py: lora_unet_double_blocks_N_… plus lora_te1_ (CLIP-L)."""
    g = gen(11)
    t = _kohya_pair(g, "lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072)
    t |= _kohya_pair(g, "lora_unet_single_blocks_0_linear1", 21504, 3072)
    t |= _kohya_pair(g, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    path = save(tmp_path / "flux.safetensors", t, {"ss_base_model_version": "flux1"})
    with pytest.raises(ArchitectureMismatchError, match=r"is a Flux LoRA \(2 of 3 modules"):
        read_lora(path, arch_hint=SD1)
    info = describe_lora(path)
    assert info.family == "Flux"
    assert info.architecture is None
    assert (info.reason or "").startswith("flux.safetensors is a Flux LoRA")


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["transformer.single_transformer_blocks.0.proj_mlp"], "Flux"),
        (["transformer.transformer_blocks.0.attn.add_q_proj"], "SD3"),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv"], "SD3"),
    ],
)
def test_diffusers_flux_and_sd3_files_are_named(tmp_path, keys: list[str], family: str) -> None:
    g = gen(12)
    t: dict[str, torch.Tensor] = {}
    for k in keys:
        if k.startswith("transformer."):
            t |= {f"{k}.lora_A.weight": rnd(g, 2, 16), f"{k}.lora_B.weight": rnd(g, 16, 2)}
        else:
            t |= _kohya_pair(g, k, 16, 16)
    path = save(tmp_path / "dit.safetensors", t)
    with pytest.raises(ArchitectureMismatchError, match=rf"is a {family} LoRA"):
        read_lora(path, arch_hint=SD1)
    assert describe_lora(path).family == family


def test_norm_side_parts_are_noted_not_counted_as_lost(tmp_path: Path) -> None:
    """LyCORIS norms.py: w_norm / b_norm modules; full.py diff_b beside a LoRA."""
    g = gen(13)
    t = _kohya_pair(g, SD1_TE_Q, 768, 768) | _kohya_pair(g, SD1_K, 320, 768)
    t["lora_te_text_model_encoder_layers_0_layer_norm1.w_norm"] = rnd(g, 768)
    t["lora_te_text_model_encoder_layers_0_layer_norm1.b_norm"] = rnd(g, 768)
    lf = read_lora(save(tmp_path / "n.safetensors", t))
    assert len(lf.deltas) == 2
    assert len(lf.unmatched) == 2
    assert lf.notes == ["1 side parts (bias / norm deltas) not merged"]


def test_a_whole_text_encoder_that_matches_nothing_is_refused(tmp_path: Path) -> None:
    """A text encoder under the wrong width is not dropped under a note (issue 10 item 5)."""
    g = gen(14)
    t: dict[str, torch.Tensor] = {}
    for i in range(3):
        name = f"lora_unet_up_blocks_2_attentions_{i}_transformer_blocks_0_attn2_to_k"
        t |= _kohya_pair(g, name, 640, 768)
    t |= _kohya_pair(g, "lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 1024)  # SD2-wide
    path = save(tmp_path / "te.safetensors", t)
    with pytest.raises(
        UnmatchedKeysError, match=r"its text encoder \(1 modules\) would be dropped"
    ):
        read_lora(path, arch_hint=SD1, max_unmatched_fraction=1.0)


def test_every_adapter_part_is_a_known_key_part() -> None:
    from loraclr_ext.files.formats import ADAPTER_PARTS

    for part in ADAPTER_PARTS:
        assert split_key(f"lora_unet_x.{part}") == ("lora_unet_x", part)


@pytest.mark.parametrize(
    ("down_key", "up_key", "ref"),
    [
        # OneTrainer internal backup: dotted lora_unet.<diffusers path>
        (
            f"lora_unet.{ATTN1_Q}.lora_down.weight",
            f"lora_unet.{ATTN1_Q}.lora_up.weight",
            ModuleRef("unet", ATTN1_Q),
        ),
        # diffusers 0.21-0.24 LoRACompatibleLinear: <module>.lora.down.weight
        (
            f"unet.{ATTN1_Q}.lora.down.weight",
            f"unet.{ATTN1_Q}.lora.up.weight",
            ModuleRef("unet", ATTN1_Q),
        ),
        # Forge state-dict names for the text encoder
        (
            f"clip_l.transformer.{TE_Q}.lora_down.weight",
            f"clip_l.transformer.{TE_Q}.lora_up.weight",
            ModuleRef("te1", TE_Q),
        ),
        # checkpoint-style ldm names
        (
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight",
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_B.weight",
            ModuleRef("unet", ATTN1_Q),
        ),
        # diffusers' kohya export of an SD1 LoRA names the only text encoder lora_te1_
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            ModuleRef("te1", TE_Q),
        ),
    ],
)
def test_more_prefixes_of_the_table(tmp_path: Path, down_key: str, up_key: str, ref) -> None:
    g = gen(17)
    size = 640 if ref.component == "unet" else 768
    t = {down_key: rnd(g, 2, size), up_key: rnd(g, size, 2)}
    lf = read_lora(save(tmp_path / "p.safetensors", t), arch_hint=SD1)
    assert lf.unmatched == []
    assert rel(lf.deltas[ref].dense(), t[up_key] @ t[down_key]) < 1e-5


def test_precheck_refuses_a_misfit_flattened_conv_before_any_model(tmp_path: Path) -> None:
    g = gen(18)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    t = {f"{name}.lora_down.weight": rnd(g, 2, 320 * 4), f"{name}.lora_up.weight": rnd(g, 320, 2)}
    t |= _kohya_pair(g, SD1_K, 320, 768)  # attn2.to_k from 768: the file is SD1
    path = save(tmp_path / "misfit.safetensors", t)
    with pytest.raises(UnmatchedKeysError, match=r"1 of 2 modules cannot be merged"):
        precheck_lora(path)
