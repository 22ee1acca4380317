"""The tiny offline pipelines: real diffusers/transformers classes, generated vocabulary."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from loraclr_ext.demo.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    build_tiny_pipeline,
    build_tiny_tokenizer,
    save_tiny_model,
    tiny_vocab,
)
from loraclr_ext.model.architecture import Architecture


def test_vocab_is_clip_shaped() -> None:
    v = tiny_vocab()
    # 256 byte characters, their word-final forms, one entry per merge, BOS and EOS last.
    assert v.size == 512 + len(v.merges) + 2
    assert 200 <= len(v.merges) <= 1000
    assert v.vocab["!"] == 0
    assert (v.bos_id, v.eos_id) == (v.size - 2, v.size - 1)
    assert sorted(v.vocab.values()) == list(range(v.size))


@pytest.mark.parametrize(
    "word", ["photo", "of", "a", "portrait", "sks", "zwx", "qpr", "dog", "castle", "style"]
)
def test_demo_words_are_single_tokens(word: str) -> None:
    tok = build_tiny_tokenizer()
    ids = tok(word).input_ids
    v = tiny_vocab()
    assert ids == [v.bos_id, v.vocab[word + "</w>"], v.eos_id]


def test_unknown_words_still_tokenize_into_known_pieces() -> None:
    tok = build_tiny_tokenizer()
    ids = tok("Grumpy dinosaur #42!").input_ids
    assert ids[0] == tiny_vocab().bos_id
    assert ids[-1] == tiny_vocab().eos_id
    assert len(ids) > 4
    assert max(ids) < tiny_vocab().size
    assert tok.convert_ids_to_tokens(ids[1:-1]).count(EOS_TOKEN) == 0


@pytest.mark.parametrize("arch", list(Architecture))
def test_encoders_match_vocab_and_seed_fixes_weights(arch: Architecture) -> None:
    a = build_tiny_pipeline(arch, seed=3)
    b = build_tiny_pipeline(arch, seed=3)
    c = build_tiny_pipeline(arch, seed=4)
    assert a.text_encoder.config.vocab_size == tiny_vocab().size
    assert a.text_encoder.config.eos_token_id == a.tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert a.tokenizer.convert_tokens_to_ids(BOS_TOKEN) == tiny_vocab().bos_id
    wa = a.unet.conv_in.weight
    assert torch.equal(wa, b.unet.conv_in.weight)
    assert not torch.equal(wa, c.unet.conv_in.weight)
    # Building must not disturb the caller's global RNG stream.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_pipeline(arch)
    assert torch.equal(torch.rand(3), expected)


def test_layouts_mirror_the_real_models() -> None:
    sd1 = build_tiny_pipeline(Architecture.SD1)
    proj_in = sd1.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert isinstance(proj_in, torch.nn.Conv2d)
    assert proj_in.kernel_size == (1, 1)
    xl = build_tiny_pipeline(Architecture.SDXL)
    assert xl.unet.config.addition_embed_type == "text_time"
    assert xl.unet.config.cross_attention_dim == (
        xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    )
    assert isinstance(xl.unet.get_submodule("down_blocks.1.attentions.0.proj_in"), torch.nn.Linear)
    # Deeper levels stack more transformer blocks, as SDXL's 1/2/10 do.
    xl.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k")
    assert xl.tokenizer_2.pad_token == "!"


def test_saved_folder_has_the_diffusers_layout(tmp_path) -> None:
    folder = save_tiny_model(Architecture.SDXL, tmp_path / "xl")
    for name in ("model_index.json", "scheduler/scheduler_config.json", "vae/config.json"):
        assert (folder / name).is_file(), name
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert list((folder / part).glob("*.safetensors")), part
    for part in ("tokenizer", "tokenizer_2"):
        assert (folder / part / "vocab.json").is_file()
        assert (folder / part / "merges.txt").is_file()


def test_vocab_files_alone_reproduce_the_tokenizer(tmp_path) -> None:
    from transformers import CLIPTokenizer

    from loraclr_ext.demo.tiny import write_vocab_files

    write_vocab_files(tmp_path)
    loaded = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    prompt = "a portrait of zwx woman in the castle, style of qpr"
    assert loaded(prompt).input_ids == build_tiny_tokenizer()(prompt).input_ids
