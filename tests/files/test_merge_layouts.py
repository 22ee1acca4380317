"""End to end on a tiny SD1 model: a diffusers/PEFT LoRA whose alpha lives only in the
header metadata (conv included) merged with a kohya LoRA; the merge reproduces the PEFT
LoRA at its true strength, and the merged file loads in diffusers with no key left over."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraclr_ext.demo.tiny import build_tiny_pipeline
from loraclr_ext.engine import run_merge
from loraclr_ext.files.metadata import LoraMetadata
from loraclr_ext.files.read import read_lora
from loraclr_ext.files.write import write_lora
from loraclr_ext.hosts.standalone import StandaloneHost
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
from loraclr_ext.pipeline.plan import plan_merge
from loraclr_ext.report.quality import _run

pytest.importorskip("peft", reason="diffusers needs peft to load LoRAs")
SD1 = Architecture.SD1
FAST = {"steps": 1, "size": 64, "quality": False, "precision": "fp32"}
# out_proj included: diffusers 0.42 infers the text part's layout from a "to_out_lora" key
# after its kohya conversion and fails on a text LoRA without one (not our file's fault).
TEXT = ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.0.self_attn.out_proj")
UNET = ("attn2.to_k", "attn2.to_v", "resnets.0.conv1")
PEFT_META = {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 4, "text_encoder.lora_alpha": 2}


def _targets(host, leaves):
    return [ref for ref in host.all_refs() if ref.path.endswith(leaves)]


def _peft_file(host, path: Path, seed: int) -> tuple[Path, dict]:
    """diffusers ``save_lora_weights`` layout: ``unet.<path>.lora_A.weight`` (a conv's A is
    ``[r, in, kh, kw]``, B ``[out, r, 1, 1]``), alpha only in ``lora_adapter_metadata``."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for ref in _targets(host, TEXT + UNET):
        weight = host.base_weight(ref)
        out = weight.shape[0]
        conv = ref.path.endswith("conv1")
        inp = weight.shape[1] // 9 if conv else weight.shape[1]
        a = torch.randn(4, inp, *((3, 3) if conv else ()), generator=g) * 0.1
        b = torch.randn(out, 4, *((1, 1) if conv else ()), generator=g) * 0.1
        head = "unet." if ref.component == "unet" else "text_encoder."
        tensors[f"{head}{ref.path}.lora_A.weight"] = a
        tensors[f"{head}{ref.path}.lora_B.weight"] = b
        scale = 8 / 4 if ref.component == "unet" else 2 / 4
        expected[ref] = scale * b.reshape(out, 4) @ a.reshape(4, -1)
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(PEFT_META)})
    return path, expected


def _kohya_file(host, path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for ref in _targets(host, (*TEXT, "attn2.to_k", "attn1.to_q")):
        out, inp = host.base_weight(ref).shape
        deltas[ref] = ModuleDelta(
            torch.randn(out, 2, generator=g) * 0.1, torch.randn(2, inp, generator=g) * 0.1
        )
    return write_lora(
        path, deltas, SD1, LoraMetadata(triggers=["zwx"]), sidecar=False, check_shapes=False
    )


def _lora_modules(model) -> int:
    return len({n for n, _ in model.named_modules() if re.search(r"\.lora_A\.[^.]+$", n)})


@pytest.mark.slow
def test_peft_metadata_lora_merges_with_kohya_and_loads_in_diffusers(tmp_path: Path) -> None:
    host = StandaloneHost.from_pipeline(build_tiny_pipeline(SD1), "cpu")
    peft, expected = _peft_file(host, tmp_path / "peft.safetensors", 1)
    kohya = _kohya_file(host, tmp_path / "kohya.safetensors", 2)

    lf = read_lora(peft, SD1, check_shapes=False)
    assert lf.format == "peft" and lf.unmatched == []
    assert set(lf.deltas) == set(expected)
    for ref, dense in expected.items():
        assert float((lf.deltas[ref].dense() - dense).norm() / dense.norm()) < 1e-5, ref
    assert lf.deltas[next(r for r in expected if r.path.endswith("conv1"))].kernel == (3, 3)

    # One concept: the merge reproduces the PEFT LoRA at alpha/r, not at scale 1.
    one = plan_merge(
        [ConceptSpec(peft, "sks dog")],
        MergeOptions(preserve=0.0, **FAST),
        SD1,
        tmp_path / "one.safetensors",
        check_shapes=False,
        min_concepts=1,
    )
    result = run_merge(one, host, write=False)
    prompts = ["a photo of sks dog", "sks dog on a beach"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    modules = host.modules(one.refs)
    base = _run(host, modules, {}, prompts, latents)
    own = _run(host, modules, one.concepts[0].deltas, prompts, latents)
    mine = _run(host, modules, result.factors, prompts, latents)
    assert float((mine.eps - own.eps).norm() / (own.eps - base.eps).norm()) < 1e-3
    text_err = (mine.cond.context - own.cond.context).norm() / (
        own.cond.context - base.cond.context
    ).norm()
    assert float(text_err) < 1e-3

    # Two concepts, two layouts: the written kohya file loads in diffusers, every module.
    out = tmp_path / "merged.safetensors"
    two = plan_merge(
        [ConceptSpec(peft, "sks dog"), ConceptSpec(kohya, "zwx cat")],
        MergeOptions(**FAST),
        SD1,
        out,
        check_shapes=False,
    )
    merged = run_merge(two, host)
    assert len(merged.factors) == len(
        set(expected) | set(read_lora(kohya, SD1, check_shapes=False).deltas)
    )
    pipe = build_tiny_pipeline(SD1)
    pipe.load_lora_weights(str(out))
    installed = _lora_modules(pipe.unet) + _lora_modules(pipe.text_encoder)
    assert installed == len(merged.factors)


def _dora_file(host, path: Path, seed: int) -> Path:
    """A LyCORIS-style kohya DoRA (``dora_scale [out, 1]``, wd_on_out) on the tiny model."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for ref in _targets(host, ("attn2.to_k", "attn2.to_v", "layers.0.self_attn.q_proj")):
        weight = host.base_weight(ref)
        out, inp = weight.shape
        name = ("lora_unet_" if ref.component == "unet" else "lora_te_") + ref.path.replace(
            ".", "_"
        )
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, inp, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
        norms = weight.norm(dim=1, keepdim=True)
        tensors[f"{name}.dora_scale"] = norms * (1 + 0.1 * torch.randn(out, 1, generator=g))
    save_file(tensors, str(path))
    return path


@pytest.mark.slow
def test_dora_lora_merges_through_engine_with_the_hosts_base_weights(tmp_path: Path) -> None:
    from loraclr_ext.engine import merge
    from loraclr_ext.files.dora import dora_dense
    from loraclr_ext.hosts.weights import weights_fingerprint

    host = StandaloneHost.from_pipeline(build_tiny_pipeline(SD1), "cpu")
    before = weights_fingerprint(host.pipe.unet)
    dora = _dora_file(host, tmp_path / "dora.safetensors", 3)
    kohya = _kohya_file(host, tmp_path / "kohya.safetensors", 4)

    lf = read_lora(dora, SD1, check_shapes=False, base_weight=host.base_weight)
    ref = next(r for r in lf.deltas if r.path.endswith("attn2.to_k"))
    name = "lora_unet_" + ref.path.replace(".", "_")
    t = load_file(str(dora))
    dw = t[f"{name}.lora_up.weight"] @ t[f"{name}.lora_down.weight"]  # alpha/r = 1
    expected = dora_dense(host.base_weight(ref), dw, t[f"{name}.dora_scale"], "out", None)
    assert float((lf.deltas[ref].dense().double() - expected).norm() / expected.norm()) < 1e-5

    out = tmp_path / "merged.safetensors"
    specs = [ConceptSpec(dora, "sks dog"), ConceptSpec(kohya, "zwx cat")]
    result = merge(specs, MergeOptions(**FAST), out, lambda: host, check_shapes=False)
    note = result.unmatched["dora.safetensors"]
    assert note.startswith(f"DoRA: {len(lf.deltas)} modules baked exactly")
    assert weights_fingerprint(host.pipe.unet) == before
    pipe = build_tiny_pipeline(SD1)
    pipe.load_lora_weights(str(out))
    installed = _lora_modules(pipe.unet) + _lora_modules(pipe.text_encoder)
    assert installed == len(result.factors)
