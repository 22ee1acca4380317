"""Reading every supported LoRA format into exact deltas, and refusing bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from loraclr_ext.errors import ArchitectureMismatchError, LoraFileError, UnmatchedKeysError
from loraclr_ext.files.detect import lora_architecture
from loraclr_ext.files.read import describe_lora, read_lora
from loraclr_ext.files.triggers import triggers_from_metadata
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.targets import ModuleRef

SD1, SD2, SDXL = Architecture.SD1, Architecture.SD2, Architecture.SDXL
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 768 -> 768 in SD1
TE_Q_REF = ModuleRef("te1", "text_model.encoder.layers.0.self_attn.q_proj")
ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # 768 -> 320
ATTN2_K_REF = ModuleRef("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # 320 -> 320, 3x3
CONV1_REF = ModuleRef("unet", "down_blocks.0.resnets.0.conv1")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _kohya(name: str, out: int, inp: int, r: int, alpha: float | None, g: torch.Generator) -> dict:
    t = {
        f"{name}.lora_down.weight": torch.randn(r, inp, generator=g),
        f"{name}.lora_up.weight": torch.randn(out, r, generator=g),
    }
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(alpha)
    return t


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).norm() / b.norm()) < tol


# ----------------------------------------------------------------------------- formats


def test_kohya_lora_alpha_scale_and_missing_alpha(tmp_path: Path) -> None:
    g = _gen()
    t = _kohya(TE_Q, 768, 768, 4, 2.0, g) | _kohya(ATTN2_K, 320, 768, 8, None, g)
    lf = read_lora(_save(tmp_path / "a.safetensors", t))
    assert lf.architecture is SD1
    assert lf.format == "lora"
    assert lf.unmatched == []
    q = lf.deltas[TE_Q_REF]
    expected = 0.5 * t[f"{TE_Q}.lora_up.weight"] @ t[f"{TE_Q}.lora_down.weight"]
    assert q.rank == 4
    assert q.kernel is None
    assert _close(q.dense(), expected)
    k = lf.deltas[ATTN2_K_REF]  # no alpha: scale 1
    assert _close(k.dense(), t[f"{ATTN2_K}.lora_up.weight"] @ t[f"{ATTN2_K}.lora_down.weight"])


def test_scale_key_and_zero_alpha(tmp_path: Path) -> None:
    g = _gen(1)
    t = _kohya(TE_Q, 768, 768, 4, 2.0, g) | _kohya(ATTN2_K, 320, 768, 4, 0.0, g)
    t[f"{TE_Q}.scale"] = torch.tensor(3.0)  # A1111 honours 'scale' over alpha/rank
    lf = read_lora(_save(tmp_path / "s.safetensors", t))
    prod = t[f"{TE_Q}.lora_up.weight"] @ t[f"{TE_Q}.lora_down.weight"]
    assert _close(lf.deltas[TE_Q_REF].dense(), 3.0 * prod)
    prod_k = t[f"{ATTN2_K}.lora_up.weight"] @ t[f"{ATTN2_K}.lora_down.weight"]
    assert _close(lf.deltas[ATTN2_K_REF].dense(), prod_k)  # alpha 0 means scale 1 (kohya)


def test_locon_conv_and_cp_mid_equal_the_convolutions(tmp_path: Path) -> None:
    g = _gen(2)
    conv2 = "lora_unet_down_blocks_0_resnets_0_conv2"
    t = {
        f"{CONV1}.lora_down.weight": torch.randn(4, 320, 3, 3, generator=g),
        f"{CONV1}.lora_up.weight": torch.randn(320, 4, 1, 1, generator=g),
        f"{CONV1}.alpha": torch.tensor(2.0),
        f"{conv2}.lora_down.weight": torch.randn(3, 320, 1, 1, generator=g),
        f"{conv2}.lora_mid.weight": torch.randn(3, 3, 3, 3, generator=g),
        f"{conv2}.lora_up.weight": torch.randn(320, 3, 1, 1, generator=g),
    }
    lf = read_lora(_save(tmp_path / "c.safetensors", t))
    assert lf.format == "locon"
    x = torch.randn(1, 320, 6, 6, generator=g)
    d1 = lf.deltas[CONV1_REF]
    assert d1.kernel == (3, 3)
    assert d1.in_features == 320 * 9
    ref1 = 0.5 * F.conv2d(
        F.conv2d(x, t[f"{CONV1}.lora_down.weight"], padding=1), t[f"{CONV1}.lora_up.weight"]
    )
    got1 = F.conv2d(x, d1.dense().reshape(320, 320, 3, 3), padding=1)
    assert _close(got1, ref1, 1e-4)
    d2 = lf.deltas[ModuleRef("unet", "down_blocks.0.resnets.0.conv2")]
    assert d2.rank == 3
    assert d2.kernel == (3, 3)
    h = F.conv2d(x, t[f"{conv2}.lora_down.weight"])
    h = F.conv2d(h, t[f"{conv2}.lora_mid.weight"], padding=1)
    ref2 = F.conv2d(h, t[f"{conv2}.lora_up.weight"])
    got2 = F.conv2d(x, d2.dense().reshape(320, 320, 3, 3), padding=1)
    assert _close(got2, ref2, 1e-4)


def test_loha_plain_and_tucker(tmp_path: Path) -> None:
    g = _gen(3)
    r = 4
    t = {
        f"{TE_Q}.hada_w1_a": torch.randn(768, r, generator=g),
        f"{TE_Q}.hada_w1_b": torch.randn(r, 768, generator=g),
        f"{TE_Q}.hada_w2_a": torch.randn(768, r, generator=g),
        f"{TE_Q}.hada_w2_b": torch.randn(r, 768, generator=g),
        f"{TE_Q}.alpha": torch.tensor(2.0),
    }
    ta = [torch.randn(r, r, 3, 3, generator=g) for _ in range(2)]
    wa = [torch.randn(r, 320, generator=g) for _ in range(4)]
    t |= {
        f"{CONV1}.hada_t1": ta[0],
        f"{CONV1}.hada_t2": ta[1],
        f"{CONV1}.hada_w1_a": wa[0],
        f"{CONV1}.hada_w1_b": wa[1],
        f"{CONV1}.hada_w2_a": wa[2],
        f"{CONV1}.hada_w2_b": wa[3],
    }
    lf = read_lora(_save(tmp_path / "h.safetensors", t))
    assert lf.format == "loha"
    w1 = t[f"{TE_Q}.hada_w1_a"] @ t[f"{TE_Q}.hada_w1_b"]
    w2 = t[f"{TE_Q}.hada_w2_a"] @ t[f"{TE_Q}.hada_w2_b"]
    q = lf.deltas[TE_Q_REF]
    assert q.rank == r * r
    assert _close(q.dense(), w1 * w2 * 2.0 / r)

    def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(320, 320, 3, 3)
        for p in range(r):
            for q_ in range(r):
                out += torch.outer(a[p], b[q_])[:, :, None, None] * core[p, q_]
        return out

    dense = tucker(ta[0], wa[0], wa[1]) * tucker(ta[1], wa[2], wa[3])  # no alpha: scale 1
    d = lf.deltas[CONV1_REF]
    assert d.kernel == (3, 3)
    assert _close(d.dense(), dense.reshape(320, -1), 1e-4)


def test_lokr_factored_full_and_conv(tmp_path: Path) -> None:
    g = _gen(4)
    # te q: 768 = 8 * 96; w1 full [8, 8], w2 = w2_a [96, 4] @ w2_b [4, 96], alpha 2 -> 0.5
    t = {
        f"{TE_Q}.lokr_w1": torch.randn(8, 8, generator=g),
        f"{TE_Q}.lokr_w2_a": torch.randn(96, 4, generator=g),
        f"{TE_Q}.lokr_w2_b": torch.randn(4, 96, generator=g),
        f"{TE_Q}.alpha": torch.tensor(2.0),
        # attn2.to_k: 320 x 768 = (4*80) x (4*192); both full -> scale 1 despite alpha
        f"{ATTN2_K}.lokr_w1": torch.randn(4, 4, generator=g),
        f"{ATTN2_K}.lokr_w2": torch.randn(80, 192, generator=g),
        f"{ATTN2_K}.alpha": torch.tensor(7.0),
        # conv1: 320 x 320 x 3 x 3 = kron([4, 4], [80, 80, 3, 3])
        f"{CONV1}.lokr_w1": torch.randn(4, 4, generator=g),
        f"{CONV1}.lokr_w2": torch.randn(80, 80, 3, 3, generator=g),
    }
    lf = read_lora(_save(tmp_path / "k.safetensors", t))
    assert lf.format == "lokr"
    w2 = t[f"{TE_Q}.lokr_w2_a"] @ t[f"{TE_Q}.lokr_w2_b"]
    assert _close(lf.deltas[TE_Q_REF].dense(), torch.kron(t[f"{TE_Q}.lokr_w1"], w2) * 0.5)
    full = torch.kron(t[f"{ATTN2_K}.lokr_w1"], t[f"{ATTN2_K}.lokr_w2"])
    assert _close(lf.deltas[ATTN2_K_REF].dense(), full)
    conv = torch.kron(t[f"{CONV1}.lokr_w1"][:, :, None, None], t[f"{CONV1}.lokr_w2"])
    d = lf.deltas[CONV1_REF]
    assert d.kernel == (3, 3)
    assert _close(d.dense(), conv.reshape(320, -1), 1e-4)


def test_full_diff_and_diff_b_unmatched(tmp_path: Path) -> None:
    g = _gen(5)
    low = torch.randn(768, 5, generator=g) @ torch.randn(5, 768, generator=g)
    t = {f"{TE_Q}.diff": low, f"{TE_Q}.diff_b": torch.randn(768, generator=g)}
    t |= {f"{ATTN2_K}.diff": torch.randn(320, 768, generator=g)}
    for i in range(10):
        t |= _kohya(f"lora_te_text_model_encoder_layers_{i}_mlp_fc2", 768, 3072, 2, None, g)
    lf = read_lora(_save(tmp_path / "d.safetensors", t))
    assert lf.format == "full+lora"
    q = lf.deltas[TE_Q_REF]
    assert q.rank == 5
    assert _close(q.dense(), low)
    k = lf.deltas[ATTN2_K_REF]
    assert k.rank == 320
    assert _close(k.dense(), t[f"{ATTN2_K}.diff"])
    assert len(lf.unmatched) == 1
    assert lf.unmatched[0].startswith(f"{TE_Q}.diff_b: bias delta (diff_b)")
    assert lf.notes == ["1 side parts (bias / norm deltas) not merged"]


def test_peft_and_diffusers_spellings(tmp_path: Path) -> None:
    g = _gen(6)
    unet_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    t = {
        f"unet.{unet_path}.lora_A.weight": torch.randn(4, 768, generator=g),
        f"unet.{unet_path}.lora_B.weight": torch.randn(320, 4, generator=g),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.randn(
            2, 768, generator=g
        ),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": torch.randn(
            768, 2, generator=g
        ),
        "text_encoder.encoder.layers.0.self_attn.q_proj.alpha": torch.tensor(1.0),
    }
    lf = read_lora(_save(tmp_path / "p.safetensors", t))
    assert lf.format == "peft"
    assert lf.architecture is SD1
    a, b = t[f"unet.{unet_path}.lora_A.weight"], t[f"unet.{unet_path}.lora_B.weight"]
    assert _close(lf.deltas[ATTN2_K_REF].dense(), b @ a)
    pre = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
    expected = 0.5 * t[f"{pre}.up.weight"] @ t[f"{pre}.down.weight"]
    assert _close(lf.deltas[TE_Q_REF].dense(), expected)


def test_sdxl_ldm_names_and_te2(tmp_path: Path) -> None:
    g = _gen(7)
    t = _kohya("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 640, 2048, 2, 2.0, g)
    t |= _kohya("lora_te2_text_model_encoder_layers_31_mlp_fc1", 5120, 1280, 2, 2.0, g)
    t |= _kohya("lora_unet_down_blocks_2_attentions_1_proj_in", 1280, 1280, 2, 2.0, g)
    lf = read_lora(_save(tmp_path / "x.safetensors", t))
    assert lf.architecture is SDXL
    assert lf.unmatched == []
    assert set(lf.deltas) == {
        ModuleRef("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
        ModuleRef("te2", "text_model.encoder.layers.31.mlp.fc1"),
        ModuleRef("unet", "down_blocks.2.attentions.1.proj_in"),
    }


def test_sd1_ldm_names_and_linear_proj_in_get_native_kernel(tmp_path: Path) -> None:
    g = _gen(8)
    t = _kohya("lora_unet_input_blocks_1_1_proj_in", 320, 320, 2, None, g)  # 2-D in file
    t |= _kohya(ATTN2_K, 320, 768, 2, None, g)
    lf = read_lora(_save(tmp_path / "l.safetensors", t), arch_hint=SD1)
    d = lf.deltas[ModuleRef("unet", "down_blocks.0.attentions.0.proj_in")]
    assert d.kernel == (1, 1)  # SD1 proj_in is a 1x1 conv; the delta takes that form


# ----------------------------------------------------------------------------- unmatched


def test_unmatched_modules_counted_by_kind_and_threshold(tmp_path: Path) -> None:
    g = _gen(9)
    t: dict[str, torch.Tensor] = {}
    for i in range(12):
        t |= _kohya(f"lora_te_text_model_encoder_layers_{i}_self_attn_v_proj", 768, 768, 1, 1.0, g)
    t |= _kohya("lora_te_text_model_encoder_layers_0_mlp_fc1", 8, 8, 1, 1.0, g)  # wrong shape
    path = _save(tmp_path / "u.safetensors", t)
    lf = read_lora(path)  # 1 of 13 modules unmatched = 7.7% <= 10%
    assert len(lf.deltas) == 12
    assert len(lf.unmatched) == 3
    assert lf.notes == ["1 modules whose shape does not fit"]
    t |= _kohya("lora_te_text_model_encoder_layers_1_mlp_fc1", 8, 8, 1, 1.0, g)
    path2 = _save(tmp_path / "u2.safetensors", t)
    with pytest.raises(UnmatchedKeysError, match=r"u2\.safetensors \(LoRA\): 2 of 14 modules"):
        read_lora(path2)
    t |= _kohya("lora_unet_not_a_module", 8, 8, 1, 1.0, g)  # the only UNet module: refused
    with pytest.raises(UnmatchedKeysError, match=r"its UNet \(1 modules\) would be dropped"):
        read_lora(_save(tmp_path / "u3.safetensors", t), max_unmatched_fraction=0.5)
    assert len(read_lora(path2, max_unmatched_fraction=0.2).unmatched) == 6  # 2 modules × 3 keys


def test_wrong_shape_is_unmatched(tmp_path: Path) -> None:
    g = _gen(10)
    t = _kohya(ATTN2_K, 320, 1024, 2, None, g)  # SD2-sized K on an SD1 file
    t |= _kohya(TE_Q, 768, 768, 2, None, g)
    with pytest.raises(UnmatchedKeysError, match="does not fit"):
        read_lora(_save(tmp_path / "w.safetensors", t), arch_hint=SD1)


def test_architecture_mismatch(tmp_path: Path) -> None:
    g = _gen(11)
    t = _kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, 2, None, g)
    path = _save(tmp_path / "xl.safetensors", t)
    with pytest.raises(ArchitectureMismatchError, match=r"xl\.safetensors is a SDXL LoRA"):
        read_lora(path, arch_hint=SD1)


# ----------------------------------------------------------------------------- bad files


def test_pickles_refused(tmp_path: Path) -> None:
    for name in ("a.pt", "a.ckpt", "a.pth", "a.bin"):
        with pytest.raises(LoraFileError, match=rf"{name} is a pickle.*\.safetensors"):
            read_lora(tmp_path / name)
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"x": torch.zeros(2)}, disguised)
    with pytest.raises(LoraFileError, match=r"disguised\.safetensors is a pickle"):
        read_lora(disguised)
    assert "is a pickle" in (describe_lora(disguised).reason or "")


def _safetensors_with_header_length(path: Path, tensors: dict, length: int) -> Path:
    """A valid safetensors file whose JSON header is space-padded to exactly ``length``
    bytes (the format allows trailing spaces; its own writer pads to 8-byte multiples)."""
    header: dict = {}
    blobs, offset = [], 0
    for key, tensor in tensors.items():
        blob = tensor.contiguous().numpy().tobytes()
        header[key] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(length.to_bytes(8, "little") + text.ljust(length) + b"".join(blobs))
    return path


def test_every_header_length_low_byte_reads_as_safetensors(tmp_path: Path) -> None:
    """A safetensors file's first byte is its header length's low byte; 0x80 (the pickle
    opcode) and the 255 other values must all read, with the tensors intact."""
    tensors = _kohya(TE_Q, 768, 768, 1, 1.0, _gen())
    base = 1024
    for low in range(256):
        path = _safetensors_with_header_length(
            tmp_path / f"h{low}.safetensors", tensors, base + low
        )
        assert path.read_bytes()[0] == low
        lf = read_lora(path)
        assert TE_Q_REF in lf.deltas, low
        assert describe_lora(path).reason is None, low


def test_own_output_with_0x80_header_reads(tmp_path: Path) -> None:
    """The writer's own 8-aligned header lengths hit 0x80 once in 32 metadata sizes."""
    tensors = _kohya(TE_Q, 768, 768, 1, 1.0, _gen())
    hit = None
    for pad in range(300):
        path = _save(tmp_path / f"p{pad}.safetensors", tensors, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            hit = path
            break
    assert hit is not None
    assert TE_Q_REF in read_lora(hit).deltas


def test_corrupt_truncated_and_nan_refused(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(LoraFileError, match=r"corrupt\.safetensors"):
        read_lora(corrupt)
    good = _save(tmp_path / "good.safetensors", _kohya(TE_Q, 768, 768, 2, None, _gen()))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraFileError, match=r"truncated\.safetensors"):
        read_lora(truncated)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(LoraFileError, match=r"tiny\.safetensors"):
        read_lora(tiny)
    bad = _kohya(TE_Q, 768, 768, 2, None, _gen())
    bad[f"{TE_Q}.lora_up.weight"][3, 1] = float("nan")
    with pytest.raises(LoraFileError, match=r"nan\.safetensors.*NaN"):
        read_lora(_save(tmp_path / "nan.safetensors", bad))
    with pytest.raises(LoraFileError, match=r"missing\.safetensors"):
        read_lora(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- detection


def _shapes(t: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in t.items()}


def test_detect_architecture() -> None:
    g = _gen(12)
    sd1 = _shapes(_kohya(TE_Q, 768, 768, 2, None, g))
    sd2 = _shapes(_kohya(TE_Q, 1024, 1024, 2, None, g))
    assert lora_architecture(sd1) is SD1
    assert lora_architecture(sd2) is SD2
    assert lora_architecture(_shapes(_kohya(ATTN2_K, 320, 1024, 2, None, g))) is SD2
    xl = _shapes(
        _kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048, 2, None, g)
    )
    assert lora_architecture(xl) is SDXL
    late = _shapes(_kohya("lora_te_text_model_encoder_layers_20_mlp_fc2", 1024, 4096, 2, None, g))
    assert lora_architecture(late) is SD2
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    conv_proj = {f"{proj}.lora_down.weight": (2, 32, 1, 1), f"{proj}.lora_up.weight": (32, 2, 1, 1)}
    assert lora_architecture(conv_proj) is SD1  # only SD1 has 1x1-conv proj_in
    # Self-attention alone says nothing; metadata decides or nobody does.
    self_attn = _shapes(
        _kohya(
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
            1280,
            1280,
            2,
            None,
            g,
        )
    )
    assert lora_architecture(self_attn) is None
    assert lora_architecture(self_attn, {"ss_base_model_version": "sdxl_base_v1-0"}) is SDXL
    assert lora_architecture(self_attn, {"ss_v2": "True"}) is SD2
    assert lora_architecture(self_attn, {"ss_base_model_version": "sd_v2_v"}) is SD2
    assert lora_architecture(self_attn, {"ss_base_model_version": "sd_v1"}) is SD1
    assert lora_architecture(self_attn, {"ss_v2": "False"}) is None


def test_undecidable_file_reads_with_architecture_none(tmp_path: Path) -> None:
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    lf = read_lora(_save(tmp_path / "n.safetensors", _kohya(name, 1280, 1280, 2, None, _gen())))
    assert lf.architecture is None
    assert len(lf.deltas) == 1


# ----------------------------------------------------------------------------- metadata


def test_triggers_priority() -> None:
    tags = {"set_a": {"sks dog": 10, "photo": 3}, "set_b": {"photo": 9, "grass": 1, "sky": 2}}
    assert triggers_from_metadata(
        {"modelspec.trigger_phrase": "sks dog, zwx", "ss_tag_frequency": json.dumps(tags)}
    ) == ["sks dog", "zwx"]
    meta = {"ss_tag_frequency": json.dumps(tags), "ss_output_name": "dogs"}
    assert triggers_from_metadata(meta) == ["photo", "sks dog", "sky"]
    assert triggers_from_metadata({"ss_output_name": "dogs", "ss_tag_frequency": "{bad"}) == [
        "dogs"
    ]
    assert triggers_from_metadata({}) == []


def test_sha256_metadata_and_describe(tmp_path: Path) -> None:
    g = _gen(13)
    t = _kohya(TE_Q, 768, 768, 4, None, g) | _kohya(ATTN2_K, 320, 768, 8, None, g)
    t |= {
        f"{CONV1}.lora_down.weight": torch.randn(2, 320, 3, 3, generator=g),
        f"{CONV1}.lora_up.weight": torch.randn(320, 2, 1, 1, generator=g),
    }
    meta = {"ss_output_name": "mydog", "ss_base_model_version": "sd_v1"}
    path = _save(tmp_path / "m.safetensors", t, meta)
    lf = read_lora(path)
    assert lf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert lf.metadata == meta
    assert lf.triggers == ["mydog"]
    assert lf.name == "m"
    info = describe_lora(path)
    assert info.usable
    assert info.architecture is SD1
    assert info.format == "locon"
    assert info.rank == 8
    assert info.modules == {"te1": 1, "unet": 2}
    assert info.triggers == ["mydog"]
    missing = describe_lora(tmp_path / "nope.safetensors")
    assert not missing.usable
    assert "nope.safetensors" in (missing.reason or "")
