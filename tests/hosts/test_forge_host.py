"""The merge on new Forge (``backend/``) through ``WebuiContext``, over the stand-ins in
tests/fakes/forge_fakes: detection, the lazy model, clean weights from the original
patchers, state restored after success and error, quantised storage, caches after saving,
and the UNet path against the standalone host for SD1 / SD2 (v) / SDXL."""

from __future__ import annotations

import pytest
import torch
from forge_fakes.harness import (
    fresh_forge_image,
    host_state,
    lora_patches,
    make_setup,
    merge,
    read,
    standalone_merge,
    worst_difference,
)

from loraclr_ext.errors import InvalidInputError, LoraClrError
from loraclr_ext.model.architecture import Architecture

MATCH = 2e-3
"""Worst relative difference allowed between the Forge merge and the standalone merge of
the same LoRAs (both written in fp16; the hosts run identical fp32 maths)."""


@pytest.fixture
def forge(tiny, tmp_path, monkeypatch):
    return make_setup("forge", tiny, tmp_path, monkeypatch)


def loaded(setup):
    """The real engine (what the first generation would load)."""
    return setup.ctx.model()


def test_detection_by_attributes(forge, tiny, tmp_path, monkeypatch):
    from forge_fakes.common import tiny_parts
    from forge_fakes.new_forge import FakeInitialModel
    from forge_fakes.reforge import FakeReforgeModel, ModelManagement
    from sd_model import FakeSdModel

    from loraclr_ext.errors import NoModelError
    from loraclr_ext.hosts.webui.detect import HostKind, host_kind, model_architecture

    reforge = FakeReforgeModel(tiny_parts(tiny["pipe"], Architecture.SD1), ModelManagement())
    assert host_kind(loaded(forge)) is HostKind.FORGE
    assert host_kind(reforge) is HostKind.REFORGE
    assert host_kind(FakeSdModel(tiny["pipe"])) is HostKind.A1111
    with pytest.raises(NoModelError, match="No checkpoint is loaded"):
        model_architecture(FakeInitialModel())
    assert model_architecture(loaded(forge)) is Architecture.SD1


def test_merge_reloads_lazy_model_and_matches_standalone(forge, tiny, tmp_path):
    assert type(forge.model).__name__ == "FakeInitialModel"
    # Drawing the list must not load a checkpoint; it just cannot grey anything out yet.
    assert forge.ctx.model_architecture() is None and forge.sd_models.reloads == 0
    result = merge(forge, "duo")
    assert forge.sd_models.reloads == 1 and type(forge.model).__name__ == "FakeForgeEngine"
    assert forge.model.conditioning_calls > 0
    assert result.path == forge.dir / "duo.safetensors" and result.path.is_file()
    reference = standalone_merge(forge, tiny["host"], tmp_path)
    diff = worst_difference(read(result.path), read(reference))
    assert diff < MATCH, diff
    assert forge.ctx.model_architecture() is Architecture.SD1


def test_lora_left_merged_by_a_generation_gives_the_clean_merge(forge, tmp_path):
    clean = read(merge(forge, "clean").path)
    engine = forge.model
    unet, clip = lora_patches(engine)
    engine.generate_with_lora("other.safetensors", unet, clip)
    key = next(iter(clip))
    text = engine.forge_objects_original.clip.cond_stage_model
    merged_weight = text.get_parameter(key).detach().clone()
    before = host_state(engine, forge.memory)
    seen = []

    def clean_during_merge(module, args):
        seen.append(float((text.get_parameter(key) - merged_weight).abs().max()))

    handle = text.clip_l.transformer.register_forward_pre_hook(clean_during_merge)
    try:
        again = read(merge(forge, "again").path)
    finally:
        handle.remove()
    # While the merge ran, the LoRA was out of the weights (the patch moved them by ≥ 0.1).
    assert seen and min(seen) > 0.1
    assert worst_difference(again, clean) < 1e-6
    assert host_state(engine, forge.memory) == before
    assert engine.forge_objects_original.unet.lora_loader.loaded_hash != str([])


def test_error_mid_merge_restores_everything(forge):
    engine = loaded(forge)
    unet, clip = lora_patches(engine)
    engine.generate_with_lora("other.safetensors", unet, clip)
    previous = engine.forge_objects
    before = host_state(engine, forge.memory)
    files = sorted(p.name for p in forge.dir.rglob("*"))
    text = engine.forge_objects_original.clip.cond_stage_model.clip_l.transformer
    calls = []

    def fail_on_third(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")

    handle = text.register_forward_pre_hook(fail_on_third)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            merge(forge, "failed")
    finally:
        handle.remove()
    assert engine.forge_objects is previous
    assert host_state(engine, forge.memory) == before
    assert sorted(p.name for p in forge.dir.rglob("*")) == files


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"is_sd1": False}, "not SD 1.x, SD 2.x or SDXL"),  # Flux / Chroma: no SD flag
        ({"is_sd1": False, "is_sd3": True}, "is SD3"),
    ],
    ids=["flux", "sd3"],
)
def test_flux_and_sd3_refused(forge, flags, message):
    engine = loaded(forge)
    for name, value in flags.items():
        setattr(engine, name, value)
    files = sorted(p.name for p in forge.dir.rglob("*"))
    with pytest.raises(InvalidInputError, match=message):
        merge(forge, "nope")
    assert sorted(p.name for p in forge.dir.rglob("*")) == files
    assert engine.conditioning_calls == 0
    assert forge.ctx.model_architecture() is None  # the list greys nothing out


def test_fp8_storage_is_dequantised(forge, tiny, tmp_path):
    from loraclr_ext.hosts.webui.make import make_host
    from loraclr_ext.model.targets import ModuleRef

    engine = loaded(forge)
    unet = engine.forge_objects_original.unet.model.diffusion_model
    scale = torch.tensor(0.02)
    stored = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            w8 = (module.weight.detach() / scale).to(torch.float8_e4m3fn)
            module.weight = torch.nn.Parameter(w8, requires_grad=False)
            module.scale_weight = scale
            stored[name] = w8.float() * scale
    host = make_host(engine, forge.ctx)
    ref = ModuleRef("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    expected = stored["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    assert torch.equal(host.base_weight(ref), expected)
    result = merge(forge, "fp8")
    tensors = read(result.path)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    # The K/V inputs come from the conditioning, not from these weights, so fp8 storage
    # may only move the result through W0 in the solver (measured: not at all).
    reference = read(standalone_merge(forge, tiny["host"], tmp_path))
    assert worst_difference(tensors, reference) < 0.1


@pytest.mark.parametrize("storage", ["bnb", "gguf"])
def test_packed_storage_refused_cleanly(forge, storage):
    engine = loaded(forge)
    unet = engine.forge_objects_original.unet.model.diffusion_model
    layer = unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2.to_k")
    if storage == "bnb":
        layer.weight.bnb_quantized = True
    else:
        layer.weight.gguf_cls = object
    before = host_state(engine, forge.memory)
    files = sorted(p.name for p in forge.dir.rglob("*"))
    expected = "nf4/fp4" if storage == "bnb" else "GGUF"
    with pytest.raises(InvalidInputError, match=expected):
        merge(forge, "packed")
    assert sorted(p.name for p in forge.dir.rglob("*")) == files
    assert host_state(engine, forge.memory) == before
    assert engine.conditioning_calls == 0


def test_saving_forgets_cached_loras(forge, tiny):
    from sd_model import FakeSdModel

    from loraclr_ext.hosts.webui.make import forget_cached_loras

    engine = loaded(forge)
    cache = forge.networks.load_lora_state_dict
    cache(str(forge.dir / "sks_dog.safetensors"))
    engine.current_lora_hash = str([["duo.safetensors", 1.0, 1.0, False]])
    assert cache.cache_info().currsize == 1
    merge(forge, "duo")
    assert cache.cache_info().currsize == 0
    assert engine.current_lora_hash == str([])
    assert forge.networks.refresh_calls == 1 and "duo" in forge.networks.available_networks
    # A1111 reloads a rewritten file by its mtime: nothing of its state is touched.
    cache(str(forge.dir / "sks_dog.safetensors"))
    forget_cached_loras(FakeSdModel(tiny["pipe"]), forge.networks)
    assert cache.cache_info().currsize == 1


def test_same_name_remerge_is_used_by_the_next_generation(forge):
    """A generation used ``duo``; ``duo`` is merged again (overwrite); the next generation
    with ``duo`` must merge the new patches, not keep the old ones: Forge's LoraLoader
    skips re-merging a patch set whose keys (file name, strengths) are unchanged."""
    engine = loaded(forge)
    text = engine.forge_objects_original.clip.cond_stage_model
    unet, clip = lora_patches(engine)
    key = next(iter(clip))
    clean = text.get_parameter(key).detach().clone()
    engine.generate_with_lora("duo.safetensors", unet, clip)
    merge(forge, "duo", overwrite=True)
    new_unet = {k: 2 * v for k, v in unet.items()}
    new_clip = {k: 2 * v for k, v in clip.items()}
    engine.generate_with_lora("duo.safetensors", new_unet, new_clip)
    expected = clean + new_clip[key]
    assert float((text.get_parameter(key) - expected).abs().max()) < 1e-6


def test_hooks_run_outside_inference_mode(forge):
    """Forge conditions under ``@torch.inference_mode()`` (and the host now runs it so,
    as a generation does); what the merge's own hooks make there must be ordinary tensors
    the solver's autograd refinement can use, and a delta they add must reach the output."""
    from loraclr_ext.hosts.webui.make import make_host
    from loraclr_ext.model.deltas import ModuleDelta
    from loraclr_ext.model.targets import ModuleRef
    from loraclr_ext.pipeline.hooks import applied, recording

    engine = loaded(forge)
    host = make_host(engine, forge.ctx)
    ref = ModuleRef("te1", "text_model.encoder.layers.0.self_attn.q_proj")
    modules = host.modules([ref])
    width = modules[ref].weight.shape[1]
    rows = []
    gen = torch.Generator().manual_seed(0)
    out = modules[ref].weight.shape[0]
    delta = ModuleDelta(
        torch.randn(out, 2, generator=gen), torch.randn(2, width, generator=gen), None
    )
    with host.clean_weights():
        plain = host.encode(["sks dog"])
        with recording(modules, lambda r, x, w: rows.append(x)), applied(modules, {ref: delta}):
            cond = host.encode(["sks dog"])
    assert rows and not any(t.is_inference() for t in rows)
    assert not cond.context.is_inference() and not plain.context.is_inference()
    assert float((cond.context - plain.context).abs().max()) > 1e-3  # the delta acted
    d = torch.zeros(width, 3, requires_grad=True)
    (rows[0] @ d).sum().backward()  # would raise for an inference tensor
    assert d.grad is not None and float(d.grad.abs().sum()) > 0


def reference_ddim(host, cond, steps: int, size: int, seed: int) -> torch.Tensor:
    """DDIM (η = 0) on the standalone host's UNet, DDPM timesteps spaced like the WebUI
    hosts', ε from v where the model predicts v."""
    alphas = host.pipe.scheduler.alphas_cumprod.double()
    v_pred = host.pipe.scheduler.config.prediction_type == "v_prediction"
    timesteps = torch.linspace(999, 0, steps).round().long().tolist()
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((cond.context.shape[0], 4, size // 8, size // 8), generator=gen).double()
    for i, t in enumerate(timesteps):
        a = float(alphas[t])
        a_prev = float(alphas[timesteps[i + 1]]) if i + 1 < steps else 1.0
        out = host.predict_noise(x.float(), t, cond).double()
        eps = a**0.5 * out + (1 - a) ** 0.5 * x if v_pred else out
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x.float()


@pytest.mark.parametrize("arch", [Architecture.SD1, Architecture.SD2, Architecture.SDXL])
def test_unet_path_matches_standalone(arch):
    """Conditioning, one UNet call (ε, or v for SD2) and a 4-step run through Forge's
    sigma-space ``apply_model`` agree with diffusers on the same weights."""
    from forge_fakes.common import tiny_parts
    from forge_fakes.new_forge import FakeForgeEngine, MemoryManagement

    from loraclr_ext.demo.tiny import build_tiny_pipeline
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.hosts.webui.forge import ForgeHost

    pipe = build_tiny_pipeline(arch)
    reference = StandaloneHost.from_pipeline(pipe, "cpu")
    memory = MemoryManagement()
    engine = FakeForgeEngine(tiny_parts(pipe, arch), memory)
    host = ForgeHost(engine, memory)
    prompts = ["sks dog", "a photo of zwx cat"]
    with torch.no_grad(), host.clean_weights():
        cond = host.encode(prompts)
        ref_cond = reference.encode(prompts)
        assert (cond.context - ref_cond.context).abs().max() < 1e-6
        if arch is Architecture.SDXL:
            assert (cond.pooled - ref_cond.pooled).abs().max() < 1e-6
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        for t in (999, 500, 20):
            ours = host.predict_noise(latents, t, cond)
            theirs = reference.predict_noise(latents, t, ref_cond)
            assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
        ran = host.sample(cond, steps=4, size=64, seed=0)
        expected = reference_ddim(reference, ref_cond, 4, 64, 0)
        assert (ran - expected).abs().max() < 1e-4 * expected.abs().max()
    assert engine.forge_objects_original.unet.model.diffusion_model.calls == 3 + 4


def test_sdxl_refiner_refused(tiny):
    from forge_fakes.common import tiny_parts
    from forge_fakes.new_forge import FakeForgeEngine, MemoryManagement

    from loraclr_ext.demo.tiny import build_tiny_pipeline
    from loraclr_ext.hosts.webui.forge import ForgeHost

    parts = tiny_parts(build_tiny_pipeline(Architecture.SDXL), Architecture.SDXL)
    del parts.text["clip_l"], parts.tokenizers["clip_l"]
    memory = MemoryManagement()
    with pytest.raises(LoraClrError, match="no 'clip_l' text encoder"):
        ForgeHost(FakeForgeEngine(parts, memory), memory)


@pytest.mark.slow
def test_first_merge_after_start_leaves_generation_byte_identical(forge, tiny):
    """Issue 9, items 1–2, as a real Forge showed them: a merge sent before any image was
    generated (the model built by ``forge_model_reload`` in inference mode, text encoders
    in fp16 storage) must succeed, and so must a second one, and txt2img afterwards must
    give the very bytes a just-started Forge that never merged gives."""
    expected = fresh_forge_image(tiny["pipe"])
    assert type(forge.model).__name__ == "FakeInitialModel"
    first = merge(forge, "first")
    assert first.path.is_file()
    assert forge.model.generate("a photo of a house") == expected
    second = merge(forge, "second")
    assert second.path.is_file()
    assert forge.model.generate("a photo of a house") == expected


def test_generation_after_a_failed_first_merge_is_unchanged(forge, tiny, monkeypatch):
    """Issue 9, item 2: after a merge that failed on a just-started Forge, plain txt2img
    failed in Forge's own conditioning (``F.embedding``: "Inference tensors do not track
    version counter") until a restart. It must give the bytes a Forge that never merged
    gives."""
    import loraclr_ext.engine as engine

    def failing_solver(*args, **kwargs):
        raise RuntimeError("injected failure while solving")

    monkeypatch.setattr(engine, "solve_layer", failing_solver)
    with pytest.raises(RuntimeError) as failed:
        merge(forge, "failed")
    image = forge.model.generate("a photo of a house")  # raised here on a real Forge
    assert image == fresh_forge_image(tiny["pipe"])
    assert "injected failure while solving" in str(failed.value)  # not a guard's error


def test_first_merge_unloads_what_it_loaded(forge):
    """A real Forge, merged before any generation, kept the merge's clean patchers in
    ``memory_management.current_loaded_models`` (nothing was loaded before): the merge
    must leave the memory manager holding what it held, and the UNet weights as found."""
    model = loaded(forge)  # what the merge's forge_model_reload() builds
    assert forge.memory.current_loaded_models == []
    unet_before = host_state(model, forge.memory)[2]
    merge(forge, "first")
    assert forge.memory.current_loaded_models == []
    assert host_state(model, forge.memory)[2] == unet_before


def test_no_checkpoint_at_all_is_said_in_one_line(forge):
    """A real Forge with no checkpoint file answered a merge with "Unexpected error": its
    ``forge_model_reload`` raises ``ValueError('You do not have any model! …')``. The merge
    must say there is no checkpoint, in one line, with HTTP 409, and write nothing."""
    from forge_fakes.new_forge import FakeSdModels

    from loraclr_ext.errors import NoModelError
    from loraclr_ext.ui.api import status_code
    from loraclr_ext.ui.service import user_message

    forge.ctx.sd_models = FakeSdModels(lambda: None, checkpoint=False)
    files = sorted(p.name for p in forge.dir.rglob("*"))
    for _ in range(2):  # the second try meets sd_model None (Forge dropped the placeholder)
        with pytest.raises(NoModelError) as refused:
            merge(forge, "nothing")
        message = user_message(refused.value)
        assert message.startswith("No checkpoint found: put") and "\n" not in message
        assert status_code(refused.value) == 409
    assert forge.ctx.sd_models.reloads == 0  # refused before asking Forge to load
    assert sorted(p.name for p in forge.dir.rglob("*")) == files
