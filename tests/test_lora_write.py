"""Writing kohya LoRAs: keys, shapes, metadata, sidecar, atomicity, and reading them back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraclr_ext.errors import InvalidInputError, OutputExistsError
from loraclr_ext.files import publish
from loraclr_ext.files import write as lora_write
from loraclr_ext.files.metadata import LoraMetadata
from loraclr_ext.files.names import validate_output_name
from loraclr_ext.files.read import read_lora
from loraclr_ext.files.write import write_lora
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.naming import module_specs
from loraclr_ext.model.targets import ModuleRef

SD1, SD2, SDXL = Architecture.SD1, Architecture.SD2, Architecture.SDXL
PROJ_IN = ModuleRef("unet", "down_blocks.0.attentions.0.proj_in")
TE_Q = ModuleRef("te1", "text_model.encoder.layers.0.self_attn.q_proj")
CONV1 = ModuleRef("unet", "down_blocks.0.resnets.0.conv1")


def _random_factors(arch: Architecture, rank: int, seed: int = 0) -> dict[ModuleRef, ModuleDelta]:
    g = torch.Generator().manual_seed(seed)
    return {
        s.ref: ModuleDelta(
            up=torch.randn(s.out_features, rank, generator=g),
            down=torch.randn(rank, s.flat_in, generator=g) * 0.01,
            kernel=s.kernel,
        )
        for s in module_specs(arch)
    }


def _inner(x: ModuleDelta, y: ModuleDelta) -> float:
    """Frobenius inner product <x.up @ x.down, y.up @ y.down> without forming either."""
    return float(((x.up.double().T @ y.up.double()) * (x.down.double() @ y.down.double().T)).sum())


def _max_rel_err(a: dict[ModuleRef, ModuleDelta], b: dict[ModuleRef, ModuleDelta]) -> float:
    """Largest ||a - b|| / ||b|| over modules, in factored form (dense SDXL convs are slow)."""
    assert set(a) == set(b)
    errs = []
    for k in b:
        diff2 = _inner(a[k], a[k]) - 2 * _inner(a[k], b[k]) + _inner(b[k], b[k])
        errs.append(max(diff2, 0.0) ** 0.5 / _inner(b[k], b[k]) ** 0.5)
    return max(errs)


def _small(seed: int = 0) -> dict[ModuleRef, ModuleDelta]:
    g = torch.Generator().manual_seed(seed)
    return {
        TE_Q: ModuleDelta(torch.randn(768, 4, generator=g), torch.randn(4, 768, generator=g)),
        PROJ_IN: ModuleDelta(torch.randn(320, 2, generator=g), torch.randn(2, 320, generator=g)),
        CONV1: ModuleDelta(
            torch.randn(320, 3, generator=g), torch.randn(3, 320 * 9, generator=g), (3, 3)
        ),
    }


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("arch", "dtype", "tol"), [
    (SD1, torch.float32, 1e-6),
    (SD1, torch.float16, 1e-3),
    (SD2, torch.float16, 1e-3),
    (SDXL, torch.float16, 1e-3),
])  # fmt: skip
def test_every_module_round_trips(
    tmp_path: Path, arch: Architecture, dtype: torch.dtype, tol: float
) -> None:
    factors = _random_factors(arch, rank=1)
    path = write_lora(tmp_path / "all.safetensors", factors, arch, dtype=dtype)
    lf = read_lora(path, arch_hint=arch)
    assert lf.architecture is arch
    assert lf.unmatched == []
    assert _max_rel_err(lf.deltas, factors) < tol
    assert all(lf.deltas[k].kernel == f.kernel for k, f in factors.items())


def test_exact_keys_shapes_and_alpha_sd1(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "k.safetensors", _small(), SD1)
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
        alphas = {k: f.get_tensor(k) for k in names if k.endswith(".alpha")}
        dtypes = {f.get_tensor(k).dtype for k in names}
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert shapes == {
        f"{te}.lora_down.weight": (4, 768),
        f"{te}.lora_up.weight": (768, 4),
        f"{te}.alpha": (),
        # SD1 proj_in is a 1x1 conv: written 4-D although the delta came in Linear form.
        f"{proj}.lora_down.weight": (2, 320, 1, 1),
        f"{proj}.lora_up.weight": (320, 2, 1, 1),
        f"{proj}.alpha": (),
        f"{conv}.lora_down.weight": (3, 320, 3, 3),
        f"{conv}.lora_up.weight": (320, 3, 1, 1),
        f"{conv}.alpha": (),
    }
    assert {k: float(v) for k, v in alphas.items()} == {
        f"{te}.alpha": 4.0,
        f"{proj}.alpha": 2.0,
        f"{conv}.alpha": 3.0,
    }
    assert dtypes == {torch.float16}


def test_sd2_proj_in_linear_and_sdxl_names(tmp_path: Path) -> None:
    d = ModuleDelta(torch.randn(320, 2), torch.randn(2, 320), kernel=(1, 1))
    path = write_lora(tmp_path / "two.safetensors", {PROJ_IN: d}, SD2, dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
        assert tuple(f.get_slice(key).get_shape()) == (2, 320)  # SD2 proj_in is Linear
        assert f.get_tensor(key).dtype == torch.bfloat16
    xl = {
        ModuleRef("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k"): (640, 640),
        ModuleRef("te1", "text_model.encoder.layers.0.mlp.fc1"): (3072, 768),
        ModuleRef("te2", "text_model.encoder.layers.0.mlp.fc1"): (5120, 1280),
    }
    factors = {r: ModuleDelta(torch.randn(o, 1), torch.randn(1, i)) for r, (o, i) in xl.items()}
    path = write_lora(tmp_path / "xl.safetensors", factors, SDXL)
    with safe_open(str(path), framework="pt") as f:
        assert {
            k.rsplit(".", 2)[0] if "weight" in k else k.rsplit(".", 1)[0] for k in list(f.keys())
        } == {
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        }


def test_bad_deltas_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="needs \\[320, 320\\]"):
        write_lora(
            tmp_path / "a.safetensors",
            {PROJ_IN: ModuleDelta(torch.ones(320, 1), torch.ones(1, 7))},
            SD1,
        )
    nan = ModuleDelta(torch.full((768, 1), float("nan")), torch.ones(1, 768))
    with pytest.raises(InvalidInputError, match="NaN"):
        write_lora(tmp_path / "b.safetensors", {TE_Q: nan}, SD1)
    huge = ModuleDelta(torch.full((768, 1), 1e6), torch.full((1, 768), 1e6))
    with pytest.raises(InvalidInputError, match="overflows"):
        write_lora(tmp_path / "c.safetensors", {TE_Q: huge}, SD1)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- metadata


def test_metadata_and_sidecar(tmp_path: Path) -> None:
    factors = _small()
    recipe = {"concepts": [{"prompt": "sks dog", "strength": 1.0}], "version": "0.1.0"}
    tags = [
        {"dogs": {"sks dog": 5, "grass": 1}},
        json.dumps({"dogs": {"sks dog": 2}, "cats": {"zwx": 4}}),
    ]
    path = write_lora(
        tmp_path / "pets.safetensors",
        factors,
        SD1,
        LoraMetadata(
            title="Pets",
            triggers=["sks dog", "zwx cat"],
            sources=[("dog", "a" * 64), ("cat", "b" * 64)],
            tag_frequency=tags,
            recipe=recipe,
            description="two pets",
            extra={"loraclr_note": "hi"},
        ),
    )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"  # ranks 4, 2, 3
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3"}
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "pets"
    assert json.loads(meta["ss_tag_frequency"]) == {
        "dogs": {"sks dog": 7, "grass": 1},
        "cats": {"zwx": 4},
    }
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "Pets"
    assert meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.merged_from"] == "dog, cat"
    assert meta["modelspec.trigger_phrase"] == "sks dog, zwx cat"
    assert meta["modelspec.date"][:2] == "20"
    assert json.loads(meta["loraclr_recipe"]) == recipe
    assert json.loads(meta["loraclr_sources"]) == [
        {"name": "dog", "sha256": "a" * 64},
        {"name": "cat", "sha256": "b" * 64},
    ]
    assert meta["loraclr_note"] == "hi"
    # sshs_model_hash: SHA-256 of the tensor data after the header, as A1111 recomputes it.
    blob = path.read_bytes()
    header = int.from_bytes(blob[:8], "little")
    data_hash = hashlib.sha256(blob[8 + header :]).hexdigest()
    assert meta["sshs_model_hash"] == data_hash
    assert meta["modelspec.hash_sha256"] == "0x" + data_hash
    assert len(meta["sshs_legacy_hash"]) == 8
    int(meta["sshs_legacy_hash"], 16)
    # Read back: triggers come from modelspec.trigger_phrase.
    assert read_lora(path).triggers == ["sks dog", "zwx cat"]
    sidecar = json.loads((tmp_path / "pets.json").read_text(encoding="utf-8"))
    assert sidecar == {
        "description": "two pets",
        "sd version": "SD1",
        "activation text": "sks dog, zwx cat",
        "preferred weight": 1.0,
        "negative text": "",
        "notes": "",
    }


@pytest.mark.parametrize(("arch", "version", "v2", "spec", "impl", "res", "sd"), [
    (SD2, "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "512x512", "SD2"),
    (SDXL, "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
     "https://github.com/Stability-AI/generative-models", "1024x1024", "SDXL"),
])  # fmt: skip
def test_arch_metadata(
    tmp_path: Path,
    arch: Architecture,
    version: str,
    v2: str,
    spec: str,
    impl: str,
    res: str,
    sd: str,
) -> None:
    factors = {
        TE_Q: ModuleDelta(
            torch.randn(module_specs(arch)[0].out_features, 2),
            torch.randn(2, module_specs(arch)[0].in_features),
        )
    }
    path = write_lora(tmp_path / "m.safetensors", factors, arch)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == (version, v2)
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (spec, impl)
    assert meta["modelspec.resolution"] == res
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "2"
    assert "ss_network_args" not in meta
    assert json.loads((tmp_path / "m.json").read_text())["sd version"] == sd


def test_metadata_extra_may_not_replace_ours(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="ss_output_name"):
        write_lora(
            tmp_path / "e.safetensors", _small(), SD1, LoraMetadata(extra={"ss_output_name": "x"})
        )
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- files


def test_existing_output_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match=r"out\.safetensors already exists"):
        write_lora(path, _small(), SD1)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    write_lora(path, _small(), SD1, overwrite=True)
    assert path.read_bytes() != b"precious"
    assert read_lora(path).deltas.keys() == _small().keys()


def test_existing_sidecar_blocks_write(tmp_path: Path) -> None:
    (tmp_path / "out.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"out\.json"):
        write_lora(tmp_path / "out.safetensors", _small(), SD1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora_write, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_lora(tmp_path / "fail.safetensors", _small(), SD1)
    assert list(tmp_path.iterdir()) == []


def test_failed_sidecar_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_json(final: Path, content: dict) -> Path:
        raise OSError("read-only")

    monkeypatch.setattr(publish, "write_temp_json", broken_json)
    with pytest.raises(OSError, match="read-only"):
        write_lora(tmp_path / "fail.safetensors", _small(), SD1)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="nowhere"):
        write_lora(tmp_path / "nowhere" / "x.safetensors", _small(), SD1)
    with pytest.raises(InvalidInputError, match=r"\.safetensors"):
        write_lora(tmp_path / "x.ckpt", _small(), SD1)


@pytest.mark.parametrize(("name", "reason"), [
    ("", "empty"),
    ("   ", "empty"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("..", "'..'"),
    ("x..y", "'..'"),
    ("what?", "reserved"),
    ('a"b', "reserved"),
    ("a<b>", "reserved"),
    ("tab\there", "control"),
    ("CON", "Windows"),
    ("lpt1.safetensors", "Windows"),
    ("name.", "ends with"),
    ("name ", "ends with"),
    ("x" * 201, "longer"),
])  # fmt: skip
def test_invalid_output_names(name: str, reason: str) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        validate_output_name(name)


def test_valid_output_names() -> None:
    assert validate_output_name("alice_and_bob") == "alice_and_bob"
    assert validate_output_name("Alice & Bob v1.2") == "Alice & Bob v1.2"
    assert validate_output_name("merged.safetensors") == "merged"
    assert validate_output_name("консоль") == "консоль"


# ----------------------------------------------------------------------------- third party


def test_diffusers_converts_written_file_with_no_key_left(tmp_path: Path) -> None:
    """A written SD1 file for a real tiny diffusers pipeline goes through diffusers' kohya
    converter (which raises on any left-over key); every converted module exists in the
    pipeline and carries exactly the delta we wrote."""
    from diffusers import StableDiffusionPipeline

    from loraclr_ext.demo.tiny import build_tiny_pipeline
    from loraclr_ext.model.naming import parse_module_name

    pipe = build_tiny_pipeline(SD1)
    modules: dict[ModuleRef, torch.nn.Module] = {}
    for prefix, model in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        for name, module in model.named_modules():
            ref = parse_module_name(prefix + name, SD1) if name else None
            if ref is not None:
                modules[ref] = module
    assert {r.component for r in modules} == {"unet", "te1"}
    g = torch.Generator().manual_seed(0)
    factors = {}
    for ref, module in modules.items():
        w = module.weight
        kernel = tuple(w.shape[2:]) if w.dim() == 4 else None
        up = torch.randn(w.shape[0], 2, generator=g)
        factors[ref] = ModuleDelta(up, torch.randn(2, w[0].numel(), generator=g), kernel)
    path = write_lora(
        tmp_path / "tiny.safetensors", factors, SD1, dtype=torch.float32, check_shapes=False
    )

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    assert len(state) == 2 * len(factors)
    assert len(alphas) == len(factors)
    assert set(alphas.values()) == {2.0}
    seen = set()
    for key in state:
        # diffusers spells attention LoRAs the old way: '<attn>.processor.to_q_lora.down.weight'.
        # Text MLPs use '<module>.lora_linear_layer.down.weight'.
        if key.endswith(".lora.down.weight"):
            base, up_key = key.removesuffix(".lora.down.weight"), ".lora.up.weight"
        elif key.endswith(".lora_linear_layer.down.weight"):
            base = key.removesuffix(".lora_linear_layer.down.weight")
            up_key = ".lora_linear_layer.up.weight"
        elif key.endswith("_lora.down.weight"):
            base, up_key = key.removesuffix(".down.weight"), ".up.weight"
        else:
            continue
        ref = parse_module_name(base, SD1)
        assert ref in factors
        seen.add(ref)
        down, up = state[key], state[base + up_key]
        assert down.shape[1] == modules[ref].weight.shape[1]
        product = up.reshape(up.shape[0], -1) @ down.reshape(2, -1)
        delta = factors[ref].dense()
        assert float((product - delta).norm() / delta.norm()) < 1e-6
    assert seen == set(factors)


def test_written_files_get_the_umask_permissions(tmp_path: Path) -> None:
    """Not mkstemp's owner-only 0600: the WebUI may run as another user."""
    import os

    old = os.umask(0o022)
    try:
        out = write_lora(tmp_path / "perm.safetensors", _small(), SD1)
    finally:
        os.umask(old)
    for path in (out, out.with_suffix(".json")):
        assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)
