"""The merge on reForge ``main`` (A1111 front end, old Forge backend) through
``WebuiContext``: detection, the merge against the standalone host, ComfyUI-style patchers
un-merged for the run and re-merged afterwards (also after an error), caches after
saving, and the UNet path for SD1 and SD2 (v-prediction)."""

from __future__ import annotations

import pytest
import torch
from forge_fakes.harness import (
    host_state,
    lora_patches,
    make_setup,
    merge,
    read,
    standalone_merge,
    worst_difference,
)

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.model.architecture import Architecture

MATCH = 2e-3
"""Worst relative difference allowed against the standalone merge (both fp16 files)."""


@pytest.fixture
def reforge(tiny, tmp_path, monkeypatch):
    return make_setup("reforge", tiny, tmp_path, monkeypatch)


def test_detected_and_host_made(reforge):
    from loraclr_ext.hosts.webui.detect import HostKind, host_kind
    from loraclr_ext.hosts.webui.make import make_host
    from loraclr_ext.hosts.webui.reforge import ReforgeHost

    model = reforge.model
    assert host_kind(model) is HostKind.REFORGE
    host = make_host(model, reforge.ctx)
    assert isinstance(host, ReforgeHost)
    # The UNet is the A1111 path, and the same module the clean patcher runs.
    assert host.unet is model.model.diffusion_model
    assert host.unet is model.forge_objects_original.unet.model.diffusion_model
    assert reforge.ctx.model_architecture() is Architecture.SD1


def test_merge_matches_standalone(reforge, tiny, tmp_path):
    before = host_state(reforge.model, reforge.memory)
    result = merge(reforge, "duo")
    assert result.path.is_file() and reforge.model.conditioning_calls > 0
    reference = standalone_merge(reforge, tiny["host"], tmp_path)
    diff = worst_difference(read(result.path), read(reference))
    assert diff < MATCH, diff
    # Nothing was loaded before: the merge unloads what it loaded, weights untouched.
    assert host_state(reforge.model, reforge.memory) == before


def test_lora_left_merged_gives_clean_merge_and_is_merged_again(reforge):
    clean = read(merge(reforge, "clean").path)
    model = reforge.model
    unet, clip = lora_patches(model)
    model.generate_with_lora("other.safetensors", unet, clip)
    layer = model.model.diffusion_model.get_submodule(
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    )
    merged_weight = layer.weight.detach().clone()
    before = host_state(model, reforge.memory)
    seen = []

    def during(module, args):
        # The fixture LoRAs reach attn2.to_k through the conditioning (no UNet run), so
        # look at that UNet weight whenever the text encoder runs.
        seen.append(float((layer.weight - merged_weight).abs().max()))

    text = model.forge_objects_original.clip.cond_stage_model.clip_l.transformer
    handle = text.register_forward_pre_hook(during)
    try:
        again = read(merge(reforge, "again").path)
    finally:
        handle.remove()
    assert seen and min(seen) > 0.1  # the LoRA was out of the weights during the merge
    assert worst_difference(again, clean) < 1e-6
    assert host_state(model, reforge.memory) == before
    assert torch.equal(layer.weight, merged_weight)


def test_weights_out_of_step_with_the_loaded_patcher(reforge):
    """Seen in a real reForge after merge -> generation -> merge: the clean original CLIP
    patcher is listed as loaded while the weights still carry the previous generation's
    LoRA. The merge must still run on clean weights, write its file, and leave the
    weights as the loaded patchers define them (not fail on the changed fingerprint)."""
    from forge_fakes.reforge import LoadedModel

    clean = read(merge(reforge, "clean").path)
    model, memory = reforge.model, reforge.memory
    unet, clip = lora_patches(model)
    model.generate_with_lora("other.safetensors", unet, clip)
    original = model.forge_objects_original.clip.patcher
    memory.current_loaded_models = [
        LoadedModel(original) if e.model.is_clone(original) else e
        for e in memory.current_loaded_models
    ]
    text = original.model
    assert text.current_weight_patches_uuid != original.patches_uuid  # out of step
    again = read(merge(reforge, "again").path)
    assert worst_difference(again, clean) < 1e-6
    assert text.current_weight_patches_uuid == original.patches_uuid  # in step again
    loaded = {id(e.model) for e in memory.current_loaded_models}
    assert id(original) in loaded and id(model.forge_objects_after_applying_lora.unet) in loaded


def test_error_mid_merge_restores_everything(reforge):
    model = reforge.model
    unet, clip = lora_patches(model)
    model.generate_with_lora("other.safetensors", unet, clip)
    previous = model.forge_objects
    before = host_state(model, reforge.memory)
    files = sorted(p.name for p in reforge.dir.rglob("*"))
    text = model.forge_objects_original.clip.cond_stage_model.clip_l.transformer
    calls = []

    def fail_on_second(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")

    handle = text.register_forward_pre_hook(fail_on_second)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            merge(reforge, "failed")
    finally:
        handle.remove()
    assert model.forge_objects is previous
    assert host_state(model, reforge.memory) == before
    assert sorted(p.name for p in reforge.dir.rglob("*")) == files


def test_sd3_refused_without_file(reforge):
    reforge.model.is_sd3 = True
    files = sorted(p.name for p in reforge.dir.rglob("*"))
    with pytest.raises(InvalidInputError, match="is SD3"):
        merge(reforge, "nope")
    assert sorted(p.name for p in reforge.dir.rglob("*")) == files


def test_saving_forgets_cached_loras(reforge):
    cache = reforge.networks.load_lora_state_dict
    cache(str(reforge.dir / "sks_dog.safetensors"))
    reforge.model.current_lora_hash = str([["duo.safetensors", 1.0, 1.0]])
    merge(reforge, "duo")
    assert cache.cache_info().currsize == 0
    assert reforge.model.current_lora_hash == str([])
    assert reforge.networks.refresh_calls == 1


@pytest.mark.parametrize("arch", [Architecture.SD1, Architecture.SD2])
def test_unet_path_matches_standalone(arch):
    """One UNet call through ComfyUI's sigma-space ``apply_model`` gives diffusers' ε (SD1)
    or v (SD2) on the same weights."""
    from forge_fakes.common import tiny_parts
    from forge_fakes.reforge import FakeReforgeModel, ModelManagement

    from loraclr_ext.demo.tiny import build_tiny_pipeline
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.hosts.webui.reforge import ReforgeHost

    pipe = build_tiny_pipeline(arch)
    reference = StandaloneHost.from_pipeline(pipe, "cpu")
    memory = ModelManagement()
    model = FakeReforgeModel(tiny_parts(pipe, arch), memory)
    host = ReforgeHost(model, memory)
    assert host._v_prediction() is (arch is Architecture.SD2)
    with torch.no_grad(), host.clean_weights():
        cond = host.encode(["sks dog", "zwx cat"])
        ref_cond = reference.encode(["sks dog", "zwx cat"])
        assert (cond.context - ref_cond.context).abs().max() < 1e-6
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        for t in (999, 250, 10):
            ours = host.predict_noise(latents, t, cond)
            theirs = reference.predict_noise(latents, t, ref_cond)
            assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
