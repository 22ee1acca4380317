"""The command line on files: every check that needs no model ends in one ``error:`` line
before the model loads, with nothing written; ``inspect`` says what each kind of file is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraclr_ext.cli import main
from loraclr_ext.demo.run import CONCEPTS


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def merge_args(demo, out, *extra, base=None, loras=None):
    """``demo``: a base folder and two good kohya LoRAs (the model never loads here)."""
    loras = loras or demo["loras"][:2]
    prompts = [c for c, _ in CONCEPTS[: len(loras)]]
    args = ["merge", "--base", base or demo["model"], "--out", out, "--steps", "1", "--size", "64"]
    for lora, prompt in zip(loras, prompts, strict=True):
        args += ["--lora", lora, "--prompt", prompt]
    return [*args, *extra]


def _pair(name: str, out: int, inp: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{name}.lora_down.weight": torch.randn(2, inp, generator=g),
        f"{name}.lora_up.weight": torch.randn(out, 2, generator=g),
    }


TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _dora(path: Path) -> Path:
    t = _pair(TE_Q, 768, 768) | _pair(K, 320, 768)
    t[f"{TE_Q}.dora_scale"] = torch.ones(768, 1)
    save_file(t, str(path))
    return path


def _oft(path: Path) -> Path:
    t = _pair(TE_Q, 768, 768) | _pair(K, 320, 768)
    t["lora_te_text_model_encoder_layers_0_self_attn_k_proj.oft_blocks"] = torch.zeros(4, 192, 192)
    save_file(t, str(path))
    return path


def _flux(path: Path) -> Path:
    t = _pair("lora_unet_double_blocks_0_img_attn_qkv", 96, 32)
    t |= _pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    t |= _pair("lora_unet_single_blocks_3_linear1", 96, 32)
    save_file(t, str(path), metadata={"ss_base_model_version": "flux1"})
    return path


def _bundle(path: Path) -> Path:
    t = _pair(TE_Q, 768, 768) | _pair(K, 320, 768)
    t["bundle_emb.qpr.string_to_param.*"] = torch.zeros(1, 768)
    save_file(t, str(path), metadata={"ss_output_name": "castle"})
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _corrupt_base(path: Path) -> Path:
    path.write_bytes(b"\xff\xff\xff\xff\xff\xff\x00\x00{" + b"x" * 64)
    return path


CASES = {
    "corrupt base": (
        lambda d, t: merge_args(d, t / "o.safetensors", base=_corrupt_base(t / "base.safetensors")),
        "base.safetensors cannot be read as .safetensors",
    ),
    "report folder missing": (
        lambda d, t: merge_args(d, t / "o.safetensors", "--report", t / "nosuchdir" / "rep.json"),
        "Report folder",
    ),
    "existing sidecar": (
        lambda d, t: merge_args(d, t / "o.safetensors"),
        "o.json already exists",
    ),
    "lora is a folder": (
        lambda d, t: merge_args(d, t / "o.safetensors", loras=[d["loras"][0], _folder(t / "f")]),
        "is a folder, not a LoRA file",
    ),
    "oft": (
        lambda d, t: merge_args(
            d, t / "o.safetensors", loras=[d["loras"][0], _oft(t / "d.safetensors")]
        ),
        "uses OFT in 1 of 3 modules",
    ),
    "flux": (
        lambda d, t: merge_args(
            d, t / "o.safetensors", loras=[d["loras"][0], _flux(t / "fx.safetensors")]
        ),
        "fx.safetensors is a Flux LoRA",
    ),
    "bundled embedding": (
        lambda d, t: merge_args(
            d, t / "o.safetensors", loras=[d["loras"][0], _bundle(t / "b.safetensors")]
        ),
        "bundled embedding(s) 'qpr'",
    ),
}


@pytest.fixture
def demo(tmp_path):
    base = tmp_path / "model"
    base.mkdir()
    loras = []
    for i in range(2):
        path = tmp_path / f"good{i}.safetensors"
        save_file(_pair(TE_Q, 768, 768, i) | _pair(K, 320, 768, i), str(path))
        loras.append(path)
    return {"model": base, "loras": loras}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checks_end_in_one_error_line_before_the_model_loads(
    case, demo, tmp_path, capsys, monkeypatch
):
    from loraclr_ext.hosts.standalone import StandaloneHost

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(StandaloneHost, "load", no_load)
    build, expected = CASES[case]
    argv = build(demo, tmp_path)
    if case == "existing sidecar":
        (tmp_path / "o.json").write_text("{}")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, out, err = run(capsys, *argv)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert out == ""


def test_inspect_names_each_kind(tmp_path, capsys):
    def inspect(path):
        code, out, _ = run(capsys, "inspect", path, "--json")
        return code, json.loads(out)

    code, flux = inspect(_flux(tmp_path / "fx.safetensors"))
    assert code == 1
    assert flux["architecture"] == "Flux" and "is a Flux LoRA (2 of 3 modules" in flux["reason"]

    code, dora = inspect(_dora(tmp_path / "d.safetensors"))
    assert code == 0  # baked with the base weights when merged
    assert dora["architecture"] == "SD 1.x" and dora["format"] == "lora+dora"
    assert dora["ranks"] == [2] and dora["reason"] is None

    code, oft = inspect(_oft(tmp_path / "o.safetensors"))
    assert code == 1
    assert oft["not merged"] == "1 modules of an unsupported algorithm (OFT)"
    assert "uses OFT in 1 of 3 modules" in oft["reason"]

    code, bundle = inspect(_bundle(tmp_path / "b.safetensors"))
    assert code == 1
    assert bundle["triggers"] == ["castle", "qpr"]
    assert bundle["not merged"] == "1 bundled embeddings (qpr)"

    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    flat = _pair(name, 320, 320 * 9) | _pair(K, 320, 768)
    save_file(flat, str(tmp_path / "flat.safetensors"))
    code, conv = inspect(tmp_path / "flat.safetensors")
    assert code == 0
    assert conv["format"] == "locon" and conv["modules"] == {"unet": 2}
    assert conv["reason"] is None and conv["not merged"] is None
