"""StandaloneHost on real diffusers/transformers models (tiny, and real configs on meta)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from loraclr_ext.demo.tiny import build_tiny_pipeline, save_tiny_model, tiny_vocab
from loraclr_ext.errors import InvalidInputError, LoraClrError, ModelNotFoundError
from loraclr_ext.hosts.base import Conditioning, Host
from loraclr_ext.hosts.devices import resolve_device
from loraclr_ext.hosts.model_files import builtin_config
from loraclr_ext.hosts.standalone import StandaloneHost, pipeline_architecture, resolve_modules
from loraclr_ext.hosts.text_paths import canonical_text_path, live_text_path
from loraclr_ext.hosts.weights import weights_fingerprint
from loraclr_ext.model import naming
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.targets import ModuleRef

PROMPTS = ["a photo of sks dog", "a portrait of zwx woman in the castle"]
ATTN_K = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path_factory, monkeypatch) -> Path:
    """No test may find a tokenizer in a real cache of the machine it runs on."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf_cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory) -> Path:
    return save_tiny_model(Architecture.SD1, tmp_path_factory.mktemp("m") / "sd1")


@pytest.fixture(scope="module")
def sd1() -> StandaloneHost:
    return StandaloneHost.from_pipeline(build_tiny_pipeline(Architecture.SD1), "cpu")


@pytest.fixture(scope="module")
def xl() -> StandaloneHost:
    return StandaloneHost.from_pipeline(build_tiny_pipeline(Architecture.SDXL), "cpu")


def _ldm_checkpoint(host: StandaloneHost, path: Path) -> Path:
    """Write the host's SD1 UNet + text encoder in the original ldm key layout."""
    arch = Architecture.SD1
    tensors = {
        "model.diffusion_model." + naming.ldm_unet_path(k, arch): v
        for k, v in host.pipe.unet.state_dict().items()
    }
    te_prefix = "cond_stage_model.transformer."
    for k, v in host.pipe.text_encoder.state_dict().items():
        tensors[te_prefix + canonical_text_path(k, "text_model." in k)] = v
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _sgm_sdxl_checkpoint(host: StandaloneHost, path: Path) -> Path:
    """Write the host's SDXL UNet and both text encoders in the SGM single-file layout
    (second encoder as OpenCLIP: fused q/k/v ``in_proj``, transposed ``text_projection``)."""
    arch = Architecture.SDXL
    tensors = {
        "model.diffusion_model." + naming.ldm_unet_path(k, arch): v
        for k, v in host.pipe.unet.state_dict().items()
    }
    for k, v in host.pipe.text_encoder.state_dict().items():
        path1 = canonical_text_path(k, "text_model." in k)
        tensors["conditioner.embedders.0.transformer." + path1] = v
    te2 = {
        k.removeprefix("text_model."): v for k, v in host.pipe.text_encoder_2.state_dict().items()
    }
    pre = "conditioner.embedders.1.model."
    tensors[pre + "token_embedding.weight"] = te2["embeddings.token_embedding.weight"]
    tensors[pre + "positional_embedding"] = te2["embeddings.position_embedding.weight"]
    tensors[pre + "text_projection"] = te2["text_projection.weight"].T
    for leaf in ("weight", "bias"):
        tensors[pre + f"ln_final.{leaf}"] = te2[f"final_layer_norm.{leaf}"]
    for i in range(host.pipe.text_encoder_2.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{pre}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [te2[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            tensors[f"{dst}attn.in_proj_{leaf}"] = torch.cat(qkv)
            for a, b in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                tensors[f"{dst}{a}.{leaf}"] = te2[f"{src}{b}.{leaf}"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ----------------------------------------------------------------------------- loading


def test_host_satisfies_protocol(sd1: StandaloneHost) -> None:
    assert isinstance(sd1, Host)
    assert (sd1.architecture, sd1.device, sd1.dtype) == (
        Architecture.SD1,
        torch.device("cpu"),
        torch.float32,
    )


@pytest.mark.parametrize("arch", [Architecture.SD1, Architecture.SDXL])
def test_saved_folder_loads_back_with_identical_outputs(arch: Architecture, tmp_path) -> None:
    ref = StandaloneHost.from_pipeline(build_tiny_pipeline(arch), "cpu")
    loaded = StandaloneHost.load(save_tiny_model(arch, tmp_path / "m"), "cpu")
    assert loaded.architecture is arch
    assert loaded.pipe.vae is None  # the merge never decodes; the VAE is not loaded
    a, b = ref.encode(PROMPTS), loaded.encode(PROMPTS)
    assert torch.equal(a.context, b.context)
    assert (a.pooled is None and b.pooled is None) or torch.equal(a.pooled, b.pooled)


def test_single_file_checkpoint_matches_folder(sd1: StandaloneHost, sd1_folder, tmp_path) -> None:
    ckpt = _ldm_checkpoint(sd1, tmp_path / "tiny-sd1.safetensors")
    single = StandaloneHost.load(ckpt, "cpu", config=sd1_folder)
    folder = StandaloneHost.load(sd1_folder, "cpu")
    assert single.architecture is Architecture.SD1
    a, b = folder.encode(PROMPTS), single.encode(PROMPTS)
    assert torch.equal(a.context, b.context)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(folder.predict_noise(latents, 500, a), single.predict_noise(latents, 500, b))
    for name, p in folder.pipe.unet.state_dict().items():
        assert torch.equal(p, single.pipe.unet.state_dict()[name]), name


def test_sdxl_single_file_matches_pipeline(xl: StandaloneHost, tmp_path) -> None:
    folder = save_tiny_model(Architecture.SDXL, tmp_path / "xl")
    ckpt = _sgm_sdxl_checkpoint(xl, tmp_path / "tiny-xl.safetensors")
    single = StandaloneHost.load(ckpt, "cpu", config=folder)
    assert single.architecture is Architecture.SDXL
    a, b = xl.encode(PROMPTS), single.encode(PROMPTS)
    assert torch.equal(a.context, b.context)
    assert torch.equal(a.pooled, b.pooled)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(xl.predict_noise(latents, 500, a), single.predict_noise(latents, 500, b))


def test_single_file_refuses_pickles_and_foreign_files(tmp_path) -> None:
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not really")
    with pytest.raises(InvalidInputError, match="pickled"):
        StandaloneHost.load(pickle, "cpu")
    foreign = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(InvalidInputError, match="not a Stable Diffusion checkpoint"):
        StandaloneHost.load(foreign, "cpu")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        StandaloneHost.load(tmp_path / "nothing", "cpu")


def test_missing_tokenizer_names_files_and_places(sd1_folder, tmp_path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(sd1_folder, bare, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ModelNotFoundError) as err:
        StandaloneHost.load(bare, "cpu")
    message = str(err.value)
    assert "vocab.json" in message
    assert "merges.txt" in message
    assert str(bare / "tokenizer") in message
    assert "models--openai--clip-vit-large-patch14" in message  # the HF cache was searched
    # A tokenizer folder holding only the classic pair of files is enough.
    only_pair = tmp_path / "tok"
    only_pair.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(sd1_folder / "tokenizer" / name, only_pair / name)
    host = StandaloneHost.load(bare, "cpu", tokenizer=only_pair)
    v = tiny_vocab()
    assert host.tokenize(["sks"]).ids == [[v.bos_id, v.vocab["sks</w>"], v.eos_id]]


def test_tokenizer_found_in_hf_cache(sd1_folder, tmp_path, empty_hf_cache) -> None:
    snapshot = empty_hf_cache / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    shutil.copytree(sd1_folder / "tokenizer", snapshot)
    bare = tmp_path / "bare"
    shutil.copytree(sd1_folder, bare, ignore=shutil.ignore_patterns("tokenizer"))
    host = StandaloneHost.load(bare, "cpu")
    assert host.tokenize(["photo"]).ids[0][1] == tiny_vocab().vocab["photo</w>"]


# ----------------------------------------------------------------------- devices, arch


@pytest.mark.parametrize("bad", ["banana", "tpu", "cuda:x", ""])
def test_bad_device_is_invalid_input(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_so() -> None:
    with pytest.raises(InvalidInputError, match="no CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def _meta_pipe(arch: Architecture) -> SimpleNamespace:
    """A pipeline-shaped namespace holding the real-size models, built on the meta device
    from the shipped configs (no memory, no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = builtin_config(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        te2 = None
        if arch is Architecture.SDXL:
            cfg = CLIPTextConfig.from_pretrained(root / "text_encoder_2")
            te2 = CLIPTextModelWithProjection(cfg)
    return SimpleNamespace(unet=unet, text_encoder=te1, text_encoder_2=te2)


# Published parameter counts of SD1.5, SD2.1 and SDXL-base components.
_PARAMS = {
    Architecture.SD1: (859_520_964, 123_060_480, None),
    Architecture.SD2: (865_910_724, 340_387_840, None),
    Architecture.SDXL: (2_567_463_684, 123_060_480, 694_659_840),
}


@pytest.mark.parametrize("arch", list(Architecture))
def test_shipped_configs_are_the_real_models(arch: Architecture) -> None:
    pipe = _meta_pipe(arch)
    models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    counts = tuple(None if m is None else sum(p.numel() for p in m.parameters()) for m in models)
    assert counts == _PARAMS[arch]
    assert pipeline_architecture(pipe) is arch


@pytest.mark.parametrize("arch", list(Architecture))
def test_every_enumerated_ref_resolves_in_both_transformers_namings(arch: Architecture) -> None:
    pipe = _meta_pipe(arch)
    models = {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
    refs = naming.module_refs(arch)
    found = resolve_modules(models, refs)
    missing = set(refs) - set(found)
    if arch is Architecture.SD2:
        # diffusers (and kohya) drop OpenCLIP-H's 24th layer: SD2 conditions on the
        # penultimate one. A ref to layer 23 is absent from the model, so it is left out.
        assert {r.path.split(".")[3] for r in missing} <= {"23"}
        missing = set()
    assert not missing
    for spec in naming.module_specs(arch):
        if spec.ref not in found:
            continue
        w = found[spec.ref].weight
        assert w.shape[:2] == (spec.out_features, spec.in_features), spec.ref
    # transformers 4 kept a 'text_model' level in CLIPTextModel: wrap to recreate it.
    legacy = torch.nn.Module()
    legacy.text_model = pipe.text_encoder
    found4 = resolve_modules({**models, "te1": legacy}, refs)
    assert set(found4) == set(found)
    assert all(found4[r] is found[r] for r in found)


def test_text_path_mapping_both_ways() -> None:
    canon = "text_model.encoder.layers.0.self_attn.q_proj"
    assert live_text_path(canon, has_level=False) == "encoder.layers.0.self_attn.q_proj"
    assert live_text_path(canon, has_level=True) == canon
    assert live_text_path("text_projection", has_level=True) == "text_projection"
    assert canonical_text_path("encoder.layers.0.mlp.fc1", has_level=False) == (
        "text_model.encoder.layers.0.mlp.fc1"
    )
    assert canonical_text_path(canon, has_level=True) == canon


def test_architecture_override(sd1: StandaloneHost) -> None:
    with pytest.raises(InvalidInputError, match="SDXL"):
        StandaloneHost.from_pipeline(sd1.pipe, "cpu", architecture="sdxl")
    sd2 = StandaloneHost.from_pipeline(
        build_tiny_pipeline(Architecture.SD2), "cpu", architecture=Architecture.SD2
    )
    assert sd2.architecture is Architecture.SD2


# ----------------------------------------------------------------------- modules, weights


@pytest.mark.parametrize("name", ["sd1", "xl"])
def test_all_refs_resolve_and_base_weight_is_flat_fp32_copy(name: str, request) -> None:
    host: StandaloneHost = request.getfixturevalue(name)
    refs = host.all_refs()
    found = host.modules([*refs, ModuleRef("unet", "no.such.module")])
    assert set(found) == set(refs)
    text = [r for r in refs if r.is_text]
    assert text
    assert all(r.path.startswith("text_model.") or r.path == "text_projection" for r in text)
    conv = ModuleRef("unet", "conv_in")
    w = host.base_weight(conv)
    live = found[conv].weight
    assert w.shape == (live.shape[0], live.shape[1] * 9)
    assert w.dtype == torch.float32
    assert torch.equal(w, live.detach().reshape(live.shape[0], -1))
    w.add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(w, live.detach().reshape(live.shape[0], -1))
    with pytest.raises(InvalidInputError):
        host.base_weight(ModuleRef("te2" if name == "sd1" else "unet", "nope"))


def test_sd1_proj_in_is_a_flattened_1x1_conv(sd1: StandaloneHost) -> None:
    ref = ModuleRef("unet", "down_blocks.0.attentions.0.proj_in")
    assert sd1.base_weight(ref).shape == (32, 32)


# -------------------------------------------------------------------------------- text


def test_tokenize_has_bos_eos_unpadded(sd1: StandaloneHost) -> None:
    v = tiny_vocab()
    toks = sd1.tokenize(["a photo of sks dog", "word " * 200])
    assert toks.length == 77
    assert toks.ids[0] == [v.bos_id] + [v.vocab[w + "</w>"] for w in PROMPTS[0].split()] + [
        v.eos_id
    ]
    assert len(toks.ids[1]) == 77
    assert toks.ids[1][0] == v.bos_id
    assert toks.ids[1][-1] == v.eos_id


def _padded(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids


def test_sd1_encode_is_last_hidden_state(sd1: StandaloneHost) -> None:
    cond = sd1.encode(PROMPTS)
    assert cond.context.shape == (2, 77, 32)
    assert cond.pooled is None
    with torch.no_grad():
        direct = sd1.pipe.text_encoder(_padded(sd1.pipe.tokenizer, PROMPTS)).last_hidden_state
    assert torch.equal(cond.context, direct)


def test_sdxl_encode_concatenates_penultimate_states(xl: StandaloneHost) -> None:
    cond = xl.encode(PROMPTS)
    assert cond.context.shape == (2, 77, 32 + 64)
    assert cond.pooled.shape == (2, 32)
    with torch.no_grad():
        out1 = xl.pipe.text_encoder(_padded(xl.pipe.tokenizer, PROMPTS), output_hidden_states=True)
        out2 = xl.pipe.text_encoder_2(
            _padded(xl.pipe.tokenizer_2, PROMPTS), output_hidden_states=True
        )
    torch.testing.assert_close(cond.context[..., :32], out1.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(cond.context[..., 32:], out2.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, out2.text_embeds, rtol=0, atol=0)


# ---------------------------------------------------------------------------- sampling


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd1", "xl"])
def test_sample_is_seeded_and_runs_the_unet_steps_times(name: str, request) -> None:
    host: StandaloneHost = request.getfixturevalue(name)
    cond = host.encode(PROMPTS)
    calls: list[int] = []
    seen: list[tuple[int, int]] = []
    module = host.modules([ModuleRef("unet", ATTN_K)])[ModuleRef("unet", ATTN_K)]
    handle = module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        a = host.sample(cond, steps=4, size=64, seed=7, callback=lambda i, n: seen.append((i, n)))
    finally:
        handle.remove()
    assert calls == [2, 2, 2, 2]
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert a.shape == (2, 4, 8, 8)
    assert torch.isfinite(a).all()
    assert torch.equal(a, host.sample(cond, steps=4, size=64, seed=7))
    assert not torch.allclose(a, host.sample(cond, steps=4, size=64, seed=8))


def test_pndm_scheduler_still_gives_steps_unet_calls(sd1_folder) -> None:
    from diffusers import PNDMScheduler

    host = StandaloneHost.load(sd1_folder, "cpu")
    host.pipe.scheduler = PNDMScheduler.from_config(host.pipe.scheduler.config)
    calls: list[int] = []
    handle = host.pipe.unet.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        host.sample(host.encode(PROMPTS[:1]), steps=3, size=64, seed=0)
    finally:
        handle.remove()
    assert len(calls) == 3


def test_sample_rejects_bad_sizes(sd1: StandaloneHost) -> None:
    cond = sd1.encode(PROMPTS[:1])
    with pytest.raises(InvalidInputError):
        sd1.sample(cond, steps=2, size=60, seed=0)
    with pytest.raises(InvalidInputError):
        sd1.sample(cond, steps=0, size=64, seed=0)


@pytest.mark.parametrize("name", ["sd1", "xl"])
def test_predict_noise_is_one_unet_call(name: str, request) -> None:
    host: StandaloneHost = request.getfixturevalue(name)
    cond = host.encode(PROMPTS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs: dict = {"encoder_hidden_states": cond.context}
    if cond.pooled is not None:
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": time_ids}
    with torch.no_grad():
        direct = host.pipe.unet(x, torch.tensor(321), **kwargs).sample
    assert torch.equal(host.predict_noise(x, 321, cond), direct)


def test_sdxl_requires_pooled(xl: StandaloneHost) -> None:
    cond = xl.encode(PROMPTS[:1])
    with pytest.raises(InvalidInputError, match="pooled"):
        xl.predict_noise(torch.zeros(1, 4, 8, 8), 10, Conditioning(cond.context, None))


# ------------------------------------------------------------------------ weight guard


def test_fingerprint_sees_a_single_changed_element(sd1: StandaloneHost) -> None:
    module = sd1.pipe.text_encoder
    before = weights_fingerprint(module)
    assert before == weights_fingerprint(module)
    w = module.get_submodule("encoder.layers.1.mlp.fc2").weight
    with torch.no_grad():
        old = w[3, 5].item()
        w[3, 5] += 1e-3
        assert weights_fingerprint(module) != before
        w[3, 5] = old
    assert weights_fingerprint(module) == before


def test_clean_weights_guards_the_model(sd1: StandaloneHost) -> None:
    with sd1.clean_weights():
        sd1.encode(PROMPTS)  # running the model changes nothing
    w = sd1.pipe.unet.conv_in.weight
    saved = w.detach().clone()
    try:
        with (
            pytest.raises(LoraClrError, match="UNet2DConditionModel"),
            sd1.clean_weights(),
            torch.no_grad(),
        ):
            w.mul_(1.5)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    # An error inside the context is not masked when the weights are intact.
    with pytest.raises(KeyError), sd1.clean_weights():
        raise KeyError("boom")


def test_fingerprint_of_a_tensor_larger_than_float32_indices() -> None:
    # SD1.5's largest UNet weights have ~29.5 M elements; float32 index arithmetic broke there.
    from loraclr_ext.hosts.weights import _tensor_stats

    big = torch.zeros(2**24 + 3, dtype=torch.float16)
    big[-1] = 7.0
    stats = _tensor_stats(big)
    assert stats[-1] == 7.0  # the last sample is the last element
    assert stats[1] == 7.0  # absolute sum
