"""The A1111 host on SD 2.x and SDXL: open_clip's fused attention made hookable, merges equal
to the standalone host's on the same tiny pipeline, host-merged LoRAs taken out and put back
bit-exactly (also on error), SD3 / SSD-1B / refiner refused."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lora_fixtures import FAST, snapshot
from sd_model import fake_sd_model

from loraclr_ext.demo.tiny import build_tiny_pipeline, build_tiny_tokenizer
from loraclr_ext.engine import run_merge
from loraclr_ext.errors import InvalidInputError
from loraclr_ext.files.metadata import LoraMetadata
from loraclr_ext.files.read import read_header, read_lora
from loraclr_ext.files.write import write_lora
from loraclr_ext.hosts.standalone import StandaloneHost
from loraclr_ext.hosts.webui.a1111 import A1111Host
from loraclr_ext.hosts.webui.fused_attention import (
    batch_first_calls,
    explicit_attention,
    projections,
)
from loraclr_ext.hosts.weights import weights_fingerprint
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
from loraclr_ext.pipeline.plan import plan_merge

DEVICES = SimpleNamespace(device=torch.device("cpu"), autocast=lambda disable=False: nullcontext())
CONCEPTS = ("sks dog", "zwx cat")
LEAVES = (
    *("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    *("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"),
)
FAMILIES = [Architecture.SD2, Architecture.SDXL]
UNET_CALLS = 1
"""``apply_model`` calls of a one-step merge: both concepts and the neutral prompts side by
side in one batch (``recording_groups``)."""


# ------------------------------------------------------------------------------- helpers


class SdxlAt1024(StandaloneHost):
    """The standalone host with SDXL micro-conditioning for 1024² (what the WebUI's
    ``get_learned_conditioning`` puts in the vector by default) instead of the run size."""

    def _unet_kwargs(self, cond, size):
        return super()._unet_kwargs(cond, 1024)


def tiny_pipe(arch: Architecture):
    """A tiny pipeline set up like the released model the WebUI would load: SD 2.x pads
    with '!' (id 0, as open_clip's wrapper does), and a DDIM schedule whose single step
    is t = 999 like the A1111 host's, so one-step recording runs see identical inputs."""
    from diffusers import DDIMScheduler

    pipe = build_tiny_pipeline(arch)
    if arch is Architecture.SD2:
        pipe.tokenizer = build_tiny_tokenizer(pad_token="!")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def random_loras(host: StandaloneHost, folder: Path) -> list[Path]:
    """Two random rank-4 kohya LoRAs on every text layer and the UNet attention / ff."""
    paths = []
    for seed, trigger in enumerate(CONCEPTS):
        gen = torch.Generator().manual_seed(seed)
        deltas = {}
        for ref in host.all_refs():
            if ref.path.endswith(LEAVES):
                out, inp = host.base_weight(ref).shape
                up = torch.randn(out, 4, generator=gen) * 0.05
                down = torch.randn(4, inp, generator=gen) * 0.05
                deltas[ref] = ModuleDelta(up, down, None)
        path = folder / f"{host.architecture.value}_{trigger.split()[1]}.safetensors"
        write_lora(
            path,
            deltas,
            host.architecture,
            LoraMetadata(triggers=[trigger]),
            overwrite=True,
            sidecar=False,
            check_shapes=False,
        )
        paths.append(path)
    return paths


def merge(host, arch: Architecture, loras: list[Path], out: Path):
    options = MergeOptions(**{**FAST, "output": out.stem})
    specs = [ConceptSpec(p, c) for p, c in zip(loras, CONCEPTS, strict=True)]
    plan = plan_merge(specs, options, arch, out, check_shapes=False)
    return run_merge(plan, host)


def products(result) -> dict[ModuleRef, torch.Tensor]:
    return {ref: f.up.double() @ f.down.double() for ref, f in result.factors.items()}


def worst_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[r] - b[r]).norm() / a[r].norm().clamp_min(1e-12)) for r in a)


def text_models(model) -> list[torch.nn.Module]:
    if model.is_sdxl:
        e = model.conditioner.embedders
        return [e[0].wrapped.transformer, e[1].wrapped.model]
    return [model.cond_stage_model.wrapped.model]


def fingerprint(model) -> list[str]:
    return [weights_fingerprint(m) for m in (model.model.diffusion_model, *text_models(model))]


def instance_forwards(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda a: a.value)
def family(request, tmp_path_factory):
    """Per family: tiny pipeline, its standalone host, two LoRAs, the standalone merge."""
    arch = request.param
    pipe = tiny_pipe(arch)
    standalone = SdxlAt1024.from_pipeline(pipe, "cpu", architecture=arch)
    folder = tmp_path_factory.mktemp(arch.value)
    loras = random_loras(standalone, folder)
    reference = merge(standalone, arch, loras, folder / "standalone.safetensors")
    return SimpleNamespace(
        arch=arch, pipe=pipe, standalone=standalone, loras=loras, reference=reference, dir=folder
    )


# -------------------------------------------------------------- fused attention proxies


def _mha_inputs(batch_first: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    shape = (3, 6, 16) if batch_first else (6, 3, 16)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    return mha, q, k, v


CASES = {
    "causal float mask": lambda L: {
        "need_weights": False,
        "attn_mask": torch.full((L, L), float("-inf")).triu_(1),
    },
    "bool mask, weights": lambda L: {
        "need_weights": True,
        "attn_mask": torch.ones(L, L, dtype=torch.bool).triu_(1),
    },
    "padding mask": lambda L: {
        "need_weights": False,
        "key_padding_mask": torch.arange(L).expand(3, L) >= L - 2,
    },
    "per-head weights": lambda L: {"need_weights": True, "average_attn_weights": False},
}


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_explicit_forward_equals_multihead_attention(batch_first, case):
    mha, q, k, v = _mha_inputs(batch_first)
    kwargs = CASES[case](6)
    expected, expected_w = mha(q, k, v, **kwargs)
    with explicit_attention([(mha, projections(mha))]):
        assert "forward" in mha.__dict__
        got, got_w = mha(q, k, v, **kwargs)
    assert float((got - expected).abs().max()) < 1e-6
    if expected_w is None:
        assert got_w is None
    else:
        assert float((got_w - expected_w).abs().max()) < 1e-6
    assert "forward" not in mha.__dict__
    assert torch.equal(mha(q, k, v, **kwargs)[0], expected)  # library forward is back


@torch.no_grad()
def test_proxies_see_exact_inputs_and_their_deltas_equal_weight_edits():
    mha, q, k, v = _mha_inputs(batch_first=False, seed=1)
    proj = projections(mha)
    # The proxies' weights are views of the fused tensor: same storage, right rows.
    storage = mha.in_proj_weight.untyped_storage().data_ptr()
    for i, p in enumerate((proj.q, proj.k, proj.v)):
        assert p.weight.untyped_storage().data_ptr() == storage
        assert torch.equal(p.weight, mha.in_proj_weight[16 * i : 16 * (i + 1)])
        assert torch.equal(p.bias, mha.in_proj_bias[16 * i : 16 * (i + 1)])
    assert proj.out is mha.out_proj
    seen: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(2)
    deltas = {name: torch.randn(16, 16, generator=gen) * 0.1 for name in ("q", "k", "v", "out")}
    handles = []
    for name in deltas:

        def hook(mod, args, output, name=name):
            seen[name] = args[0].clone()
            return output + args[0] @ deltas[name].T

        handles.append(proj.by_name(name).register_forward_hook(hook))
    mask = torch.full((6, 6), float("-inf")).triu_(1)
    try:
        with explicit_attention([(mha, proj)]):
            hooked = mha(q, k, v, need_weights=False, attn_mask=mask)[0]
    finally:
        for h in handles:
            h.remove()
    # Batch-first [B, T, C] views of exactly what was passed in.
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(seen[name], x.transpose(0, 1))
    assert seen["out"].shape == (3, 6, 16)
    # Same as editing the fused weights by those deltas.
    edited = torch.nn.MultiheadAttention(16, 4).eval()
    edited.load_state_dict(mha.state_dict())
    edited.in_proj_weight += torch.cat([deltas["q"], deltas["k"], deltas["v"]])
    edited.out_proj.weight += deltas["out"]
    expected = edited(q, k, v, need_weights=False, attn_mask=mask)[0]
    assert float((hooked - expected).abs().max()) < 1e-5


@torch.no_grad()
def test_forward_is_restored_after_an_error():
    mha, q, k, v = _mha_inputs(batch_first=False)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU(), torch.nn.Linear(8, 16))
    before = mha(q, k, v)[0]

    def run_and_fail():
        with explicit_attention([(mha, projections(mha))]), batch_first_calls([mlp]):
            mha(q, k, v)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_and_fail()
    assert "forward" not in mha.__dict__ and "forward" not in mlp.__dict__
    assert torch.equal(mha(q, k, v)[0], before)

    def custom(*args, **kwargs):  # someone else's instance forward is put back as found
        return "custom"

    mha.forward = custom
    with pytest.raises(KeyError), explicit_attention([(mha, projections(mha))]):
        raise KeyError("x")
    assert mha.__dict__["forward"] is custom


@torch.no_grad()
def test_batch_first_calls_keep_numbers_and_show_children_batch_first():
    gen = torch.Generator().manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU(), torch.nn.Linear(8, 16))
    x = torch.randn(6, 3, 16, generator=gen)  # [T, B, C]
    expected = mlp(x)
    seen = []
    handle = mlp[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    with batch_first_calls([mlp]):
        got = mlp(x)
    handle.remove()
    assert torch.equal(got, expected)
    assert seen == [torch.Size([3, 6, 16])]


# ----------------------------------------------------------------- the fakes are faithful


@torch.no_grad()
def test_open_clip_fake_computes_the_hf_hidden_states():
    from open_clip_model import from_hf_clip

    pipe = build_tiny_pipeline(Architecture.SDXL)
    ids = pipe.tokenizer_2(
        ["a photo of sks dog", "zwx cat"], padding="max_length", return_tensors="pt"
    ).input_ids
    hf = pipe.text_encoder_2(ids, output_hidden_states=True)
    model = from_hf_clip(pipe.text_encoder_2)
    x = (model.token_embedding(ids) + model.positional_embedding).permute(1, 0, 2)
    states = [x]
    for block in model.transformer.resblocks:
        states.append(block(states[-1], attn_mask=model.attn_mask))
    for mine, theirs in zip(states, hf.hidden_states, strict=True):
        assert float((mine.permute(1, 0, 2) - theirs).abs().max()) < 1e-5
    last = model.ln_final(states[-1].permute(1, 0, 2))
    pooled = last[torch.arange(2), ids.argmax(-1)] @ model.text_projection
    assert float((last - hf.last_hidden_state).abs().max()) < 1e-5
    assert float((pooled - hf.text_embeds).abs().max()) < 1e-5


@torch.no_grad()
def test_conditioning_tokens_and_noise_match_the_standalone_host(family):
    model = fake_sd_model(family.pipe, family.arch)
    host = A1111Host(model, DEVICES)
    prompts = ["a photo of sks dog", "zwx cat in the park, high quality detailed"]
    assert host.tokenize(prompts) == family.standalone.tokenize(prompts)
    mine, theirs = host.encode(prompts), family.standalone.encode(prompts)
    assert float((mine.context - theirs.context).abs().max()) < 1e-5
    if family.arch is Architecture.SDXL:
        assert mine.pooled.shape == (2, 32 + 6 * 8)  # the sgm vector: pooled + sizes
        assert float((mine.pooled[:, :32] - theirs.pooled).abs().max()) < 1e-5
    else:
        assert mine.pooled is None
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = host.predict_noise(x, 500, mine)
    assert float((eps - family.standalone.predict_noise(x, 500, theirs)).abs().max()) < 1e-5
    assert instance_forwards(model) == []


def test_open_clip_refs_resolve_to_views_and_skip_the_unused_layer(family):
    model = fake_sd_model(family.pipe, family.arch)
    host = A1111Host(model, DEVICES)
    comp = "te1" if family.arch is Architecture.SD2 else "te2"
    hf = family.pipe.text_encoder if comp == "te1" else family.pipe.text_encoder_2
    for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
        ref = ModuleRef(comp, f"text_model.encoder.layers.1.{leaf}")
        theirs = family.standalone.base_weight(ref)
        assert torch.equal(host.base_weight(ref), theirs)
        assert theirs.shape == (hf.config.hidden_size, hf.config.hidden_size)
    fc1 = ModuleRef(comp, "text_model.encoder.layers.0.mlp.fc1")
    assert torch.equal(host.base_weight(fc1), family.standalone.base_weight(fc1))
    blocks = text_models(model)[-1].transformer.resblocks
    last = ModuleRef(comp, f"text_model.encoder.layers.{len(blocks) - 1}.self_attn.q_proj")
    # SD 2.x stops at the penultimate resblock: its last one never runs, so is no target.
    assert (last in host.modules([last])) is (family.arch is Architecture.SDXL)


# ------------------------------------------------------------------------------ merging


def test_merge_equals_the_standalone_merge_and_reads_back(family, tmp_path):
    model = fake_sd_model(family.pipe, family.arch)
    before = fingerprint(model)
    result = merge(
        A1111Host(model, DEVICES), family.arch, family.loras, tmp_path / "a1111.safetensors"
    )
    worst = worst_relative(products(family.reference), products(result))
    assert worst < 1e-3, worst
    components = {ref.component for ref in result.factors}
    text = {"te1"} if family.arch is Architecture.SD2 else {"te1", "te2"}
    assert components == text | {"unet"}
    assert model.apply_calls == UNET_CALLS
    assert fingerprint(model) == before
    assert instance_forwards(model) == []
    back = read_lora(result.path, family.arch, check_shapes=False)
    assert back.unmatched == []
    assert set(back.deltas) == set(result.factors)
    keys, _ = read_header(result.path)
    prefixes = {k.split("_text_model")[0] for k in keys if "_text_model" in k}
    assert prefixes == (
        {"lora_te"} if family.arch is Architecture.SD2 else {"lora_te1", "lora_te2"}
    )


def _mha_restore(module: torch.nn.Module) -> None:
    """The Lora extension's ``network_restore_weights_from_backup`` (dossier §4.6): an MHA's
    backup is ``(in_proj_weight, out_proj.weight)``, anything else's its ``weight``."""
    backup = getattr(module, "network_weights_backup", None)
    if backup is None:
        return
    with torch.no_grad():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.in_proj_weight.copy_(backup[0])
            module.out_proj.weight.copy_(backup[1])
        else:
            module.weight.copy_(backup)


def _previous_generation(model) -> tuple[SimpleNamespace, list[torch.nn.Module]]:
    """Merge a fake 'other' LoRA into an MHA (SD2 te / SDXL bigG), the HF CLIP-L of SDXL and
    a UNet Linear, the way the Lora extension leaves them after a generation."""
    big = text_models(model)[-1].transformer.resblocks
    touched: list[torch.nn.Module] = [big[0].attn, big[1].attn]
    touched.append(model.model.diffusion_model.get_submodule("middle_block.1.proj_in"))
    if model.is_sdxl:
        clip_l = model.conditioner.embedders[0].wrapped.transformer
        # by suffix: transformers 4 keeps a ``text_model.`` level that 5 drops
        touched.append(
            next(m for n, m in clip_l.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        )
    with torch.no_grad():
        for module in touched:
            if isinstance(module, torch.nn.MultiheadAttention):
                module.network_weights_backup = (
                    module.in_proj_weight.detach().clone(),
                    module.out_proj.weight.detach().clone(),
                )
                module.in_proj_weight.add_(0.25)
                module.out_proj.weight.add_(-0.125)
            else:
                module.network_weights_backup = module.weight.detach().clone()
                module.weight.add_(0.25)
            module.network_current_names = (("other", 1.0, 1.0, None),)
    networks = SimpleNamespace(
        loaded_networks=["other"], network_restore_weights_from_backup=_mha_restore
    )
    return networks, touched


def test_host_merged_loras_are_taken_out_and_put_back(family, tmp_path):
    """A LoRA the Lora extension left merged in (MHA in_proj included) does not change the
    merge, and is bit-exactly back afterwards, also when the merge fails midway."""
    arch = family.arch
    model = fake_sd_model(tiny_pipe(arch), arch)  # own pipeline: its weights get edited
    clean = merge(A1111Host(model, DEVICES), arch, family.loras, tmp_path / "clean.safetensors")
    networks, touched = _previous_generation(model)
    polluted = fingerprint(model)
    mha = touched[0]
    encode = model.get_learned_conditioning

    def encode_checking_clean(*args, **kwargs):
        assert torch.equal(mha.in_proj_weight, mha.network_weights_backup[0])
        return encode(*args, **kwargs)

    model.get_learned_conditioning = encode_checking_clean
    host = A1111Host(model, DEVICES, networks)
    result = merge(host, arch, family.loras, tmp_path / "with_host_lora.safetensors")
    assert worst_relative(products(clean), products(result)) < 1e-6
    assert fingerprint(model) == polluted
    assert all(m.network_current_names == (("other", 1.0, 1.0, None),) for m in touched)
    assert networks.loaded_networks == ["other"]

    def broken_unet(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert (simulated)")

    model.apply_model = broken_unet
    out = tmp_path / "failed.safetensors"
    with pytest.raises(RuntimeError, match="simulated"):
        merge(A1111Host(model, DEVICES, networks), arch, family.loras, out)
    assert not out.exists()
    assert fingerprint(model) == polluted
    assert instance_forwards(model) == []
    assert all(m.network_current_names == (("other", 1.0, 1.0, None),) for m in touched)
    assert networks.loaded_networks == ["other"]


def test_webui_service_merges_on_an_sdxl_checkpoint(webui, tmp_path):
    """The tab's service, with an SDXL checkpoint loaded: SDXL LoRAs are listed as usable,
    the merge writes file and sidecar ('sd version' SDXL) and touches no weight."""
    arch = Architecture.SDXL
    pipe = tiny_pipe(arch)
    host = StandaloneHost.from_pipeline(pipe, "cpu")
    for path in random_loras(host, tmp_path):
        shutil.copy(path, webui["dir"] / path.name)
    model = fake_sd_model(pipe, arch)
    webui["ctx"].sd_models.model_data.sd_model = model
    ctx = webui["ctx"]
    usable = {e.name for e in ctx.list_loras() if e.usable}
    assert {"sdxl_dog", "sdxl_cat", "xl_style"} <= usable and "sks_dog" not in usable
    from loraclr_ext.ui.service import ConceptRow

    before = fingerprint(model)
    rows = [ConceptRow("sdxl_dog", "sks dog"), ConceptRow("sdxl_cat", "zwx cat")]
    result = ctx.merge(rows, MergeOptions(**{**FAST, "output": "xl_duo"}))
    assert result.path == webui["dir"] / "xl_duo.safetensors" and result.path.is_file()
    import json

    assert json.loads(result.path.with_suffix(".json").read_text())["sd version"] == "SDXL"
    assert fingerprint(model) == before and model.apply_calls == UNET_CALLS


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("flag", ["is_ssd", "is_sd3"])
def test_sd3_and_ssd_are_refused_and_nothing_is_written(webui, flag):
    from loraclr_ext.ui.service import ConceptRow

    model = fake_sd_model(build_tiny_pipeline(Architecture.SDXL), Architecture.SDXL)
    setattr(model, flag, True)
    with pytest.raises(InvalidInputError, match=r"\(SD3 / SSD-1B\) is not supported"):
        A1111Host(model, DEVICES)
    webui["ctx"].sd_models.model_data.sd_model = model
    files, before = snapshot(webui["dir"]), fingerprint(model)
    rows = [ConceptRow("sks_dog", "sks dog"), ConceptRow("zwx_cat", "zwx cat")]
    with pytest.raises(InvalidInputError, match=r"\(SD3 / SSD-1B\) is not supported"):
        webui["ctx"].merge(rows, MergeOptions(**{**FAST, "output": "never"}))
    assert snapshot(webui["dir"]) == files
    assert fingerprint(model) == before and model.apply_calls == 0


def test_sdxl_refiner_and_inpainting_are_refused():
    model = fake_sd_model(build_tiny_pipeline(Architecture.SDXL), Architecture.SDXL)
    embedders = model.conditioner.embedders
    model.conditioner.embedders = torch.nn.ModuleList(list(embedders)[1:])  # bigG only
    with pytest.raises(InvalidInputError, match="refiner"):
        A1111Host(model, DEVICES)
    model.conditioner.embedders = embedders
    model.is_sdxl_inpaint = True
    with pytest.raises(InvalidInputError, match="inpainting"):
        A1111Host(model, DEVICES)
