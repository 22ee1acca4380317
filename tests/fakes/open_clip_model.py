"""An open_clip-style text transformer (dossier §3.2, §3.3), written from the layout only.

The WebUI's SD 2.x text encoder (``cond_stage_model.wrapped.model``) and SDXL's
OpenCLIP-bigG (``conditioner.embedders[1].wrapped.model``) are open_clip ``CLIP`` models
without the vision tower: ``token_embedding``, ``positional_embedding [77, C]``,
``transformer.resblocks[i]`` = ``ln_1``, ``attn`` (``torch.nn.MultiheadAttention``, fused
``in_proj_weight [3C, C]``, sequence first), ``ln_2``, ``mlp.c_fc`` / GELU / ``mlp.c_proj``,
then ``ln_final``, ``text_projection [C, P]`` and the causal ``attn_mask`` buffer (additive,
-inf above the diagonal). :func:`from_hf_clip` fills one from a transformers CLIP text
model (q/k/v concatenated into ``in_proj``), so both compute the same hidden states.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


class QuickGELU(torch.nn.Module):
    """OpenAI CLIP's ``x·σ(1.702x)`` (SD1 / SDXL CLIP-L); OpenCLIP models use ``nn.GELU``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(torch.nn.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` on ``[L, B, C]``."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str = "gelu") -> None:
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_2 = torch.nn.LayerNorm(width)
        activation = torch.nn.GELU() if act == "gelu" else QuickGELU()
        self.mlp = torch.nn.Sequential(
            OrderedDict(
                c_fc=torch.nn.Linear(width, mlp_width),
                gelu=activation,
                c_proj=torch.nn.Linear(mlp_width, width),
            )
        )

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if attn_mask is None else attn_mask.to(x.dtype)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(torch.nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = torch.nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, act) for _ in range(layers)
        )


class OpenClipTextModel(torch.nn.Module):
    """The text half of an open_clip ``CLIP`` (``visual`` deleted, as the WebUI's embedders do)."""

    def __init__(
        self,
        vocab: int,
        width: int,
        layers: int,
        heads: int,
        mlp_width: int,
        projection: int,
        act: str = "gelu",
        context_length: int = 77,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_width, act)
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.zeros(width, projection))
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)


def _hf_inner(hf: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 flattened ``CLIPTextModel``; ``…WithProjection`` keeps ``text_model``."""
    return getattr(hf, "text_model", hf)


@torch.no_grad()
def from_hf_clip(hf: torch.nn.Module, extra_layers: int = 0, seed: int = 0) -> OpenClipTextModel:
    """An open_clip text model with ``hf``'s weights (copied, not shared).

    ``extra_layers`` random resblocks are appended after the copied ones: SD 2.x's
    OpenCLIP-H has one more layer than diffusers keeps, because the WebUI stops at the
    penultimate one. ``text_projection`` is ``hf.text_projection.weight.T`` when ``hf`` has
    one, else random.
    """
    cfg = hf.config
    inner = _hf_inner(hf)
    layers = list(inner.encoder.layers)
    width, heads = cfg.hidden_size, cfg.num_attention_heads
    act = "gelu" if cfg.hidden_act == "gelu" else "quick_gelu"
    projection = getattr(cfg, "projection_dim", width)
    model = OpenClipTextModel(
        cfg.vocab_size,
        width,
        len(layers) + extra_layers,
        heads,
        cfg.intermediate_size,
        projection,
        act,
        cfg.max_position_embeddings,
    )
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    for block in model.transformer.resblocks:
        for ln in (block.ln_1, block.ln_2):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    model.token_embedding.weight.copy_(inner.embeddings.token_embedding.weight)
    model.positional_embedding.copy_(inner.embeddings.position_embedding.weight)
    for block, layer in zip(model.transformer.resblocks, layers, strict=False):
        attn = layer.self_attn
        block.attn.in_proj_weight.copy_(
            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        )
        block.attn.in_proj_bias.copy_(
            torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        )
        block.attn.out_proj.weight.copy_(attn.out_proj.weight)
        block.attn.out_proj.bias.copy_(attn.out_proj.bias)
        for mine, theirs in ((block.ln_1, layer.layer_norm1), (block.ln_2, layer.layer_norm2)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        block.mlp.c_fc.load_state_dict(layer.mlp.fc1.state_dict())
        block.mlp.c_proj.load_state_dict(layer.mlp.fc2.state_dict())
    model.ln_final.load_state_dict(inner.final_layer_norm.state_dict())
    if hasattr(hf, "text_projection"):
        model.text_projection.copy_(hf.text_projection.weight.T)
    return model.eval()


class OpenClipTokenizer:
    """open_clip's ``SimpleTokenizer`` surface the WebUI wrappers use (``encode`` without
    specials, ``encoder`` with ``<start_of_text>`` / ``<end_of_text>``), over the tiny
    CLIP vocabulary."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.encoder = dict(hf_tokenizer.get_vocab())
        self.encoder["<start_of_text>"] = hf_tokenizer.bos_token_id
        self.encoder["<end_of_text>"] = hf_tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False).input_ids)
