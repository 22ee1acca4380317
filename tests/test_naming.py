"""Module enumeration, kohya names and the diffusers <-> ldm UNet map."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.naming import (
    diffusers_unet_path,
    kohya_index,
    kohya_name,
    ldm_unet_path,
    module_refs,
    module_specs,
    parse_diffusers_name,
    parse_kohya_name,
    parse_module_name,
)
from loraclr_ext.model.targets import ModuleRef

SD1, SD2, SDXL = Architecture.SD1, Architecture.SD2, Architecture.SDXL


def _counts(arch: Architecture) -> Counter:
    return Counter((s.ref.component, s.group) for s in module_specs(arch))


def test_enumeration_counts() -> None:
    # peers.md §5.1: SD1 = 72 text + 192 UNet; SDXL = 72 + 192 text + 722 UNet linear.
    assert _counts(SD1) == {
        ("te1", "text"): 72,
        ("unet", "transformer"): 192,
        ("unet", "locon"): 86,
        ("unet", "embedding"): 4,
    }
    assert _counts(SD2) == {
        ("te1", "text"): 144,  # 24 OpenCLIP-H layers in HF layout
        ("unet", "transformer"): 192,
        ("unet", "locon"): 86,
        ("unet", "embedding"): 4,
    }
    assert _counts(SDXL) == {
        ("te1", "text"): 72,
        ("te2", "text"): 192,
        ("unet", "transformer"): 722,
        ("unet", "locon"): 66,
        ("unet", "embedding"): 6,
    }
    for arch in Architecture:
        refs = module_refs(arch)
        assert len(refs) == len(set(refs))


def test_module_shapes_of_known_modules() -> None:
    spec = {s.ref: s for s in module_specs(SD1)}
    proj_in = spec[ModuleRef("unet", "down_blocks.0.attentions.0.proj_in")]
    assert (proj_in.in_features, proj_in.out_features, proj_in.kernel) == (320, 320, (1, 1))
    to_k = spec[ModuleRef("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k")]
    assert (to_k.in_features, to_k.out_features, to_k.kernel) == (768, 1280, None)
    xl = {s.ref: s for s in module_specs(SDXL)}
    ff = xl[ModuleRef("unet", "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.0.proj")]
    assert (ff.in_features, ff.out_features) == (1280, 10240)
    fc1 = xl[ModuleRef("te2", "text_model.encoder.layers.31.mlp.fc1")]
    assert (fc1.in_features, fc1.out_features) == (1280, 5120)
    sd2 = {s.ref: s for s in module_specs(SD2)}
    assert sd2[ModuleRef("unet", "down_blocks.0.attentions.0.proj_in")].kernel is None


@pytest.mark.parametrize("arch", list(Architecture))
def test_enumeration_equals_real_diffusers_unet(arch: Architecture) -> None:
    """Paths, sizes and kernels equal every Linear/Conv2d of a real UNet (meta device)."""
    from diffusers import UNet2DConditionModel

    configs = {
        SD1: {"cross_attention_dim": 768, "attention_head_dim": 8},
        SD2: {
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        },
        SDXL: {
            "block_out_channels": (320, 640, 1280),
            "cross_attention_dim": 2048,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs[arch])
    live = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            w = module.weight
            live[name] = (w.shape[1], w.shape[0], tuple(w.shape[2:]) if w.dim() == 4 else None)
    mine = {
        s.ref.path: (s.in_features, s.out_features, s.kernel)
        for s in module_specs(arch)
        if s.ref.component == "unet"
    }
    assert mine == live
    # The ldm map covers every parameter, not only LoRA targets, and inverts exactly.
    for name, _ in unet.named_parameters():
        assert diffusers_unet_path(ldm_unet_path(name, arch), arch) == name


def test_ldm_map_agrees_with_diffusers_converter() -> None:
    """diffusers' own ldm->diffusers converter turns our ldm names back into the originals."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    state = unet.state_dict()
    ldm = {"model.diffusion_model." + ldm_unet_path(k, SD1): v for k, v in state.items()}
    assert set(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == set(state)


@pytest.mark.parametrize(
    ("arch", "diffusers", "ldm"),
    [
        (SD1, "down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
        (SD1, "down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
        (SD1, "down_blocks.1.resnets.0.conv2", "input_blocks.4.0.out_layers.3"),
        (SD1, "down_blocks.1.resnets.0.time_emb_proj", "input_blocks.4.0.emb_layers.1"),
        (SD1, "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        (SD1, "down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
        (SD1, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "middle_block.1.transformer_blocks.0.attn2.to_k"),  # noqa: E501
        (SD1, "mid_block.resnets.1.conv1.weight", "middle_block.2.in_layers.2.weight"),
        (SD1, "up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
        (SD1, "up_blocks.3.resnets.2.conv1", "output_blocks.11.0.in_layers.2"),
        (SD1, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        (SD1, "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        (SD1, "conv_in", "input_blocks.0.0"),
        (SD1, "conv_out", "out.2"),
        (SD1, "time_embedding.linear_1", "time_embed.0"),
        (SD1, "time_embedding.linear_2", "time_embed.2"),
        (SDXL, "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k", "input_blocks.4.1.transformer_blocks.1.attn1.to_k"),  # noqa: E501
        (SDXL, "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", "input_blocks.8.1.transformer_blocks.9.ff.net.2"),  # noqa: E501
        (SDXL, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        (SDXL, "up_blocks.1.attentions.2.proj_in", "output_blocks.5.1.proj_in"),
        (SDXL, "add_embedding.linear_1", "label_emb.0.0"),
        (SDXL, "add_embedding.linear_2", "label_emb.0.2"),
    ],
)  # fmt: skip
def test_ldm_examples(arch: Architecture, diffusers: str, ldm: str) -> None:
    assert ldm_unet_path(diffusers, arch) == ldm
    assert diffusers_unet_path(ldm, arch) == diffusers


@pytest.mark.parametrize("arch", list(Architecture))
def test_ldm_map_is_a_bijection_on_modules(arch: Architecture) -> None:
    paths = [r.path for r in module_refs(arch) if r.component == "unet"]
    ldm = [ldm_unet_path(p, arch) for p in paths]
    assert len(set(ldm)) == len(paths)
    assert [diffusers_unet_path(p, arch) for p in ldm] == paths


@pytest.mark.parametrize(
    ("arch", "path", "to_ldm"),
    [
        (SDXL, "down_blocks.0.attentions.0.proj_in", True),  # SDXL block 0 has no attention
        (SD1, "down_blocks.3.downsamplers.0.conv", True),  # last block has no downsampler
        (SD1, "up_blocks.0.attentions.0.proj_in", True),
        (SD1, "output_blocks.0.1.proj_in", False),
        (SD1, "input_blocks.3.1.proj_in", False),
        (SD1, "bogus.module", False),
    ],
)
def test_invalid_unet_paths_raise(arch: Architecture, path: str, to_ldm: bool) -> None:
    with pytest.raises(InvalidInputError, match="UNet path"):
        (ldm_unet_path if to_ldm else diffusers_unet_path)(path, arch)


def test_kohya_name_examples() -> None:
    q = ModuleRef("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert (
        kohya_name(q, SD1) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    te = ModuleRef("te1", "text_model.encoder.layers.0.self_attn.q_proj")
    assert kohya_name(te, SD1) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name(te, SD2) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name(te, SDXL) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    te2 = ModuleRef("te2", "text_model.encoder.layers.31.mlp.fc2")
    assert kohya_name(te2, SDXL) == "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    k = ModuleRef("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k")
    assert kohya_name(k, SDXL) == "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k"
    out = ModuleRef("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0")
    assert kohya_name(out, SD1).endswith("attn1_to_out_0")


@pytest.mark.parametrize("arch", list(Architecture))
def test_kohya_round_trip_every_module(arch: Architecture) -> None:
    unet_count = 0
    for ref in module_refs(arch):
        assert parse_kohya_name(kohya_name(ref, arch), arch) == ref
        if ref.component == "unet":
            unet_count += 1
            diff_style = "lora_unet_" + ref.path.replace(".", "_")
            ldm_style = "lora_unet_" + ldm_unet_path(ref.path, arch).replace(".", "_")
            assert parse_kohya_name(diff_style, arch) == ref
            assert parse_kohya_name(ldm_style, arch) == ref
    n_text = len(module_refs(arch)) - unet_count
    assert len(kohya_index(arch)) == n_text + 2 * unet_count  # both UNet spellings distinct


def test_parse_rejects_unknown_and_other_arch_names() -> None:
    assert parse_kohya_name("lora_unet_down_blocks_0_attentions_0_proj_in", SDXL) is None
    assert parse_kohya_name("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", SD1) is None
    assert parse_kohya_name("lora_te_text_model_encoder_layers_12_mlp_fc1", SD1) is None
    assert parse_kohya_name("lora_te_text_model_encoder_layers_12_mlp_fc1", SD2) is not None
    assert parse_kohya_name("lora_unet_down_blocks_0_attentions_0_norm", SD1) is None


def test_diffusers_and_peft_names() -> None:
    path = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"
    ref = ModuleRef("unet", path)
    assert parse_diffusers_name(f"unet.{path}", SD1) == ref
    assert parse_module_name(f"unet.{ldm_unet_path(path, SD1)}", SD1) == ref
    assert (
        parse_module_name(
            "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora", SD1
        )
        == ref
    )
    te = ModuleRef("te1", "text_model.encoder.layers.3.mlp.fc1")
    assert parse_module_name("text_encoder.text_model.encoder.layers.3.mlp.fc1", SD1) == te
    assert parse_module_name("text_encoder.encoder.layers.3.mlp.fc1", SD1) == te  # transformers 5
    old = "text_encoder.text_model.encoder.layers.3.self_attn.to_out_lora"
    assert parse_module_name(old, SD1) == ModuleRef(
        "te1", "text_model.encoder.layers.3.self_attn.out_proj"
    )
    te2 = ModuleRef("te2", "text_model.encoder.layers.20.self_attn.v_proj")
    assert parse_module_name("text_encoder_2.encoder.layers.20.self_attn.v_proj", SDXL) == te2
    assert parse_module_name("text_encoder_2.encoder.layers.20.self_attn.v_proj", SD1) is None
    assert parse_module_name("vae.decoder.conv_in", SD1) is None
