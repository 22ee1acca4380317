"""A merge that fails, at any stage and for any reason, leaves each WebUI exactly as it was:
the same model state (weights, patchers, the Lora extension's bookkeeping) and the very
same bytes from the WebUI's own txt2img path before and after (issue 9: after a failed
merge a real Forge could not generate until restarted).

Failures are injected where the merge runs: while planning (before the host is touched),
at the start of and in the middle of collecting (inside the host's text encoder, so the
host is mid-call), an Interrupt while collecting, an error and running out of memory while
solving, an error while reporting and while writing the file.
"""

from __future__ import annotations

import copy

import pytest
import torch
from forge_fakes.harness import (
    fresh_forge_image,
    host_state,
    lora_patches,
    make_setup,
)
from forge_fakes.harness import merge as forge_merge
from lora_fixtures import FAST, snapshot

from loraclr_ext.errors import MergeInterruptedError, OutOfMemoryMergeError
from loraclr_ext.hosts.weights import weights_fingerprint

pytestmark = pytest.mark.slow

STAGES = [
    "planning",
    "collect-start",
    "collect-mid",
    "interrupt",
    "solve",
    "out-of-memory",
    "report",
    "write",
]
PROMPT = "a photo of a house"


def inject(stage: str, monkeypatch, state) -> tuple[dict, type[BaseException], str]:
    """Make the next merge fail at ``stage``; returns option overrides and the expected
    error (type and message pattern)."""
    import loraclr_ext.engine as engine
    import loraclr_ext.pipeline.hooks as hooks

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure ({stage})")

    failure: tuple[type[BaseException], str] = (RuntimeError, "injected failure")
    overrides: dict = {}
    if stage == "planning":
        monkeypatch.setattr(engine, "plan_merge", boom)
    elif stage == "collect-start":
        monkeypatch.setattr(engine, "collect", boom)
    elif stage in ("collect-mid", "interrupt"):
        real, calls = hooks.input_rows, []

        def rows(x, geometry):
            calls.append(1)
            if len(calls) == 3:
                if stage == "interrupt":
                    state.interrupt()
                else:
                    boom()
            return real(x, geometry)

        monkeypatch.setattr(hooks, "input_rows", rows)
        if stage == "interrupt":
            failure = (MergeInterruptedError, "interrupted")
    elif stage in ("solve", "out-of-memory"):
        real, calls = engine.solve_layer, []

        def solve(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                if stage == "out-of-memory":
                    raise torch.OutOfMemoryError("CUDA out of memory (injected)")
                boom()
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "solve_layer", solve)
        if stage == "out-of-memory":
            failure = (OutOfMemoryMergeError, "Out of CPU memory")
    elif stage == "report":
        overrides["quality"] = True
        monkeypatch.setattr(engine, "evaluate", boom)
    elif stage == "write":
        monkeypatch.setattr(engine, "_write", boom)
    else:  # pragma: no cover
        raise AssertionError(stage)
    return overrides, *failure


# ------------------------------------------------------------------------------ A1111


def a1111_state(model, networks, touched) -> tuple:
    return (
        weights_fingerprint(model.model.diffusion_model),
        weights_fingerprint(model.cond_stage_model.wrapped.transformer),
        tuple(getattr(m, "network_current_names", ()) for m in touched),
        tuple(networks.loaded_networks),
        model.forward.__func__ if hasattr(model.forward, "__func__") else model.forward,
    )


@pytest.mark.parametrize("stage", STAGES)
def test_a1111(stage, webui, tiny, monkeypatch):
    from modules import sd_models
    from sd_model import FakeSdModel

    from loraclr_ext.ui.service import ConceptRow, parse_options

    model = FakeSdModel(copy.deepcopy(tiny["pipe"]))  # its weights get a LoRA merged in
    sd_models.model_data.set_sd_model(model)
    networks = webui["networks"]
    touched = [
        m
        for n, m in model.named_modules()
        if n.endswith(("layers.0.self_attn.q_proj", "transformer_blocks.0.attn2.to_k"))
    ]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # what the Lora extension leaves after a <lora:other:1> image
        for module in touched:
            module.network_weights_backup = module.weight.detach().clone()
            module.weight.add_(0.05 * torch.randn(module.weight.shape, generator=gen))
            module.network_current_names = (("other", 1.0, 1.0, None),)
    networks.loaded_networks[:] = ["other"]
    image = model.generate(PROMPT)
    before = a1111_state(model, networks, touched)
    files = snapshot(webui["dir"])
    overrides, error, message = inject(stage, monkeypatch, webui["shared"].state)
    ctx = webui["ctx"]
    options = parse_options(ctx, {**FAST, "output": "failed", **overrides})
    rows = [ConceptRow("sks_dog", "sks dog"), ConceptRow("zwx_cat", "zwx cat")]
    with pytest.raises(error, match=message), ctx.job():
        ctx.merge(rows, options)
    assert a1111_state(model, networks, touched) == before
    assert snapshot(webui["dir"]) == files
    assert model.generate(PROMPT) == image


# ------------------------------------------------------------------------------ Forge


def forge_state(engine, memory) -> tuple:
    return (*host_state(engine, memory), id(engine.forge_objects.clip), engine.current_lora_hash)


@pytest.mark.parametrize("stage", STAGES)
def test_forge_fresh_start(stage, tiny, tmp_path, monkeypatch):
    """Before any image was generated (the case a real Forge broke in): the model as
    ``forge_model_reload`` built it in inference mode."""
    forge = make_setup("forge", tiny, tmp_path, monkeypatch)
    engine = forge.ctx.model()
    original = engine.forge_objects_original
    weights = (
        weights_fingerprint(original.unet.model.diffusion_model),
        weights_fingerprint(original.clip.cond_stage_model),
    )
    objects = engine.forge_objects
    files = snapshot(forge.dir)
    overrides, error, message = inject(stage, monkeypatch, forge.ctx.shared.state)
    with pytest.raises(error, match=message):
        forge_merge(forge, "failed", **overrides)
    assert forge.model is engine and engine.forge_objects is objects
    assert engine.current_lora_hash == str([])
    assert weights == (
        weights_fingerprint(original.unet.model.diffusion_model),
        weights_fingerprint(original.clip.cond_stage_model),
    )
    assert snapshot(forge.dir) == files
    assert engine.generate(PROMPT) == fresh_forge_image(tiny["pipe"], PROMPT)


@pytest.mark.parametrize("stage", ["collect-mid", "interrupt", "out-of-memory", "write"])
def test_forge_after_a_lora_generation(stage, tiny, tmp_path, monkeypatch):
    forge = make_setup("forge", tiny, tmp_path, monkeypatch)
    engine = forge.ctx.model()
    engine.generate_with_lora("other.safetensors", *lora_patches(engine))
    image = engine.generate(PROMPT)
    before = forge_state(engine, forge.memory)
    overrides, error, message = inject(stage, monkeypatch, forge.ctx.shared.state)
    with pytest.raises(error, match=message):
        forge_merge(forge, "failed", **overrides)
    assert forge_state(engine, forge.memory) == before
    assert engine.generate(PROMPT) == image


# ---------------------------------------------------------------------------- reForge


@pytest.mark.parametrize("stage", STAGES)
def test_reforge(stage, tiny, tmp_path, monkeypatch):
    reforge = make_setup("reforge", tiny, tmp_path, monkeypatch)
    model = reforge.model
    model.generate_with_lora("other.safetensors", *lora_patches(model))
    image = model.generate(PROMPT)
    before = forge_state(model, reforge.memory)
    files = snapshot(reforge.dir)
    overrides, error, message = inject(stage, monkeypatch, reforge.ctx.shared.state)
    with pytest.raises(error, match=message):
        forge_merge(reforge, "failed", **overrides)
    assert forge_state(model, reforge.memory) == before
    assert snapshot(reforge.dir) == files
    assert model.generate(PROMPT) == image
