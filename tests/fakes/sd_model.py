"""Tiny diffusers pipelines dressed as A1111 SD 1.x / SD 2.x / SDXL models (dossier §3.1–3.3,
§4.4), so the adapter reads the real attribute layout.

* UNet: ``model.diffusion_model`` whose modules carry ldm names
  (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``; the leaves are the pipeline's own
  modules), ``forward(x, timesteps, context, y)`` like ldm / sgm ``UNetModel``.
* SD 1.x: ``cond_stage_model.wrapped.transformer`` (HF CLIP) / ``.tokenizer``.
* SD 2.x: ``cond_stage_model.wrapped.model`` is an open_clip text model (fused-MHA
  resblocks, one more than diffusers keeps; the WebUI stops at the penultimate).
* SDXL: ``conditioner.embedders`` = CLIP-L wrapper (``.wrapped.transformer``, hidden state
  of the penultimate layer), OpenCLIP-bigG wrapper (``.wrapped.model``, penultimate hidden
  state + pooled), three size embedders; ``get_learned_conditioning`` returns
  ``{"crossattn": [B, 77, c1 + c2], "vector": [B, pooled + 6·d]}`` for 1024² by default.
* The text wrappers' ``tokenize`` (ids without specials), ``id_start`` / ``id_end`` /
  ``id_pad``; one 75-token chunk per prompt (no emphasis, no embeddings, no BREAK).
* ``apply_model(x, t, cond)`` with DDPM timesteps, ``alphas_cumprod``, ``parameterization``,
  the ``is_*`` flags and the Lora extension's ``network_layer_mapping``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from open_clip_model import OpenClipTokenizer, from_hf_clip

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.naming import ldm_unet_path

_LEAVES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _attach(root: torch.nn.Module, path: str, leaf: torch.nn.Module) -> None:
    *parents, last = path.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, torch.nn.Module())
        node = node._modules[part]
    node.add_module(last, leaf)


class LdmUNetView(torch.nn.Module):
    """ldm / sgm ``UNetModel`` names over a diffusers UNet's leaf modules."""

    def __init__(self, unet: torch.nn.Module, arch: Architecture = Architecture.SD1) -> None:
        super().__init__()
        object.__setattr__(self, "_unet", unet)  # not a child: only ldm names are listed
        for name, module in unet.named_modules():
            if isinstance(module, _LEAVES):
                try:
                    _attach(self, ldm_unet_path(name, arch), module)
                except InvalidInputError:
                    continue

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        """``y`` (SDXL ``vector``) goes where sgm puts it, into ``label_emb`` (diffusers'
        ``add_embedding``), replacing diffusers' own ``[text_embeds, time_proj(time_ids)]``."""
        unet = self._unet
        if y is None:
            return unet(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]
        time_dim = unet.config.addition_time_embed_dim
        batch = x.shape[0]
        dummy = {
            "text_embeds": torch.zeros(batch, y.shape[1] - 6 * time_dim, dtype=x.dtype),
            "time_ids": torch.zeros(batch, 6, dtype=x.dtype),
        }
        handle = unet.add_embedding.register_forward_pre_hook(
            lambda mod, args: (y.to(args[0].device, args[0].dtype),)
        )
        try:
            return unet(
                x,
                timesteps,
                encoder_hidden_states=context,
                added_cond_kwargs=dummy,
                return_dict=False,
            )[0]
        finally:
            handle.remove()


class DiffusionWrapper(torch.nn.Module):
    """ldm's wrapper: ``c_crossattn`` list concatenated on dim 1."""

    def __init__(self, unet: torch.nn.Module, arch: Architecture = Architecture.SD1) -> None:
        super().__init__()
        self.diffusion_model = LdmUNetView(unet, arch)

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class OpenAIWrapper(torch.nn.Module):
    """sgm's wrapper: ``cond["crossattn"]`` as context, ``cond["vector"]`` as ``y``."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.diffusion_model = LdmUNetView(unet, Architecture.SDXL)

    def forward(self, x, t, c):
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"))


# ----------------------------------------------------------------------- text embedders


class FrozenCLIPEmbedder(torch.nn.Module):
    """ldm / sgm HF-CLIP embedder: ``transformer``, ``tokenizer``, ``layer``, ``layer_idx``."""

    def __init__(
        self, transformer: torch.nn.Module, tokenizer: Any, layer: str = "last", layer_idx=None
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.layer = layer
        self.layer_idx = layer_idx


class FrozenOpenCLIPEmbedder(torch.nn.Module):
    """ldm's SD 2.x embedder: stops ``layer_idx`` resblocks before the end, then ``ln_final``."""

    layer = "penultimate"
    layer_idx = 1

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.max_length = 77

    def text_transformer_forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - self.layer_idx:
                break
            x = block(x, attn_mask=attn_mask)
        return x

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.model.token_embedding(tokens) + self.model.positional_embedding
        x = self.text_transformer_forward(x.permute(1, 0, 2), attn_mask=self.model.attn_mask)
        return self.model.ln_final(x.permute(1, 0, 2))


class FrozenOpenCLIPEmbedder2(torch.nn.Module):
    """sgm's SDXL bigG embedder (``legacy=False``): every resblock runs; the penultimate
    hidden state is the context, ``ln_final`` of the last at the EOS (highest id) position
    times ``text_projection`` is the pooled output."""

    layer = "penultimate"
    layer_idx = 1
    legacy = False

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.max_length = 77

    def encode_with_transformer(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.model.token_embedding(tokens) + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        out: dict[str, torch.Tensor] = {}
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                out["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        last = self.model.ln_final(x.permute(1, 0, 2))
        out["last"] = last
        eos = tokens.argmax(dim=-1)
        out["pooled"] = last[torch.arange(last.shape[0]), eos] @ self.model.text_projection
        return out


class CustomWordsWrapper(torch.nn.Module):
    """The WebUI's hijack wrapper (``sd_hijack_clip``), one chunk: ``[id_start] + ids[:75] +
    [id_end]``, padded with ``id_end``, positions after the first ``id_end`` set to
    ``id_pad``."""

    chunk_length = 75
    input_key = "txt"
    id_start: int
    id_end: int
    id_pad: int

    def __init__(self, wrapped: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_with_transformers(self, tokens: torch.Tensor) -> Any:
        raise NotImplementedError

    def token_rows(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for ids in self.tokenize(texts):
            row = [self.id_start, *ids[: self.chunk_length], self.id_end]
            row += [self.id_pad] * (self.chunk_length + 2 - len(row))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    def forward(self, texts: list[str]) -> Any:
        return self.encode_with_transformers(self.token_rows(texts))


class FrozenCLIPEmbedderWithCustomWords(CustomWordsWrapper):
    """SD 1.x: last hidden state (clip skip 1)."""

    def __init__(self, wrapped: FrozenCLIPEmbedder) -> None:
        super().__init__(wrapped)
        tok = wrapped.tokenizer
        self.id_start, self.id_end = tok.bos_token_id, tok.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        tok = self.wrapped.tokenizer
        return tok(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.wrapped.transformer(input_ids=tokens)[0]


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """SDXL CLIP-L: ``hidden_states[layer_idx]`` (the penultimate layer)."""

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.wrapped.transformer(input_ids=tokens, output_hidden_states=True)
        return out.hidden_states[self.wrapped.layer_idx]


class FrozenOpenCLIPEmbedderWithCustomWords(CustomWordsWrapper):
    """SD 2.x: open_clip tokenizer, pad id 0."""

    def __init__(self, wrapped: torch.nn.Module, tokenizer: OpenClipTokenizer) -> None:
        super().__init__(wrapped)
        self.tokenizer = tokenizer
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t) for t in texts]

    def encode_with_transformers(self, tokens: torch.Tensor) -> Any:
        return self.wrapped.encode_with_transformer(tokens)


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenOpenCLIPEmbedderWithCustomWords):
    """SDXL bigG: ``(penultimate hidden state, pooled)``."""

    def encode_with_transformers(self, tokens: torch.Tensor) -> Any:
        out = self.wrapped.encode_with_transformer(tokens)
        return out[self.wrapped.layer], out["pooled"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """sgm's sinusoidal embedding ``[cos, sin]`` of ``t [N]`` → ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConcatTimestepEmbedderND(torch.nn.Module):
    """sgm size embedder: every number of ``x [B, d]`` embedded to ``outdim``, ``[B, d·outdim]``."""

    def __init__(self, outdim: int, input_key: str) -> None:
        super().__init__()
        self.outdim = outdim
        self.input_key = input_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(batch, -1)


class GeneralConditioner(torch.nn.Module):
    """sgm: each embedder's outputs go to ``vector`` (2-D, cat on dim 1) or ``crossattn``
    (3-D, cat on dim 2)."""

    def __init__(self, embedders: list[torch.nn.Module]) -> None:
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)
        self.wrapped = torch.nn.Module()  # extend_sdxl adds an empty one

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {}
        for embedder in self.embedders:
            emb = embedder(batch[embedder.input_key])
            for tensor in emb if isinstance(emb, tuple | list) else (emb,):
                out.setdefault("vector" if tensor.dim() == 2 else "crossattn", []).append(tensor)
        return {"vector": torch.cat(out["vector"], 1), "crossattn": torch.cat(out["crossattn"], 2)}


# ------------------------------------------------------------------------------ models


class _FakeModel(torch.nn.Module):
    """What every ``shared.sd_model`` has: flags, schedule, ``apply_model`` call count and
    the Lora extension's ``network_layer_mapping`` / ``network_layer_name``."""

    is_sd1 = is_sd2 = is_sdxl = is_ssd = is_sd3 = False
    lowvram = False

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", pipe.scheduler.alphas_cumprod.clone().float())
        v = pipe.scheduler.config.get("prediction_type") == "v_prediction"
        self.parameterization = "v" if v else "eps"
        self.apply_calls = 0
        self.network_layer_mapping: dict[str, torch.nn.Module] = {}

    @torch.no_grad()
    def generate(self, prompt: str, seed: int = 0, steps: int = 3, size: int = 64) -> bytes:
        """txt2img as A1111 1.10 runs it (``torch.no_grad``): ``get_learned_conditioning``,
        then DDIM (η = 0, no CFG) through ``apply_model``; the final latents as bytes, so
        two generations can be compared exactly."""
        cond = self.get_learned_conditioning([prompt])
        alphas = self.alphas_cumprod.double()
        timesteps = torch.linspace(len(alphas) - 1, 0, steps).round().long().tolist()
        gen = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((1, 4, size // 8, size // 8), generator=gen)
        for i, t in enumerate(timesteps):
            a = float(alphas[t])
            a_prev = float(alphas[timesteps[i + 1]]) if i + 1 < steps else 1.0
            out = self.apply_model(x, torch.tensor([t]), cond).float()
            eps = a**0.5 * out + (1 - a) ** 0.5 * x if self.parameterization == "v" else out
            x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x.numpy().tobytes()

    def _map_networks(self, roots: list[tuple[str, torch.nn.Module]]) -> None:
        for prefix, root in roots:
            for name, module in root.named_modules():
                key = prefix + name.replace(".", "_")
                self.network_layer_mapping[key] = module
                module.network_layer_name = key


class FakeSdModel(_FakeModel):
    """``shared.sd_model`` for SD 1.x."""

    is_sd1 = True

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.model = DiffusionWrapper(pipe.unet)
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(
            FrozenCLIPEmbedder(pipe.text_encoder, pipe.tokenizer)
        )
        self._map_networks([("", self.model), ("", self.cond_stage_model.wrapped)])

    def get_learned_conditioning(self, c: list[str]) -> torch.Tensor:
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        self.apply_calls += 1
        if not isinstance(cond, dict):
            cond = {"c_crossattn": [cond]}
        return self.model(x_noisy, t, **cond)


class FakeSd2Model(FakeSdModel):
    """``shared.sd_model`` for SD 2.x: the text encoder is an open_clip copy of the
    pipeline's (plus one unused last resblock)."""

    is_sd1, is_sd2 = False, True

    def __init__(self, pipe: Any) -> None:
        _FakeModel.__init__(self, pipe)
        self.model = DiffusionWrapper(pipe.unet, Architecture.SD2)
        text = from_hf_clip(pipe.text_encoder, extra_layers=1)
        self.cond_stage_model = FrozenOpenCLIPEmbedderWithCustomWords(
            FrozenOpenCLIPEmbedder(text), OpenClipTokenizer(pipe.tokenizer)
        )
        self._map_networks([("", self.model), ("", self.cond_stage_model.wrapped)])


class FakeSdxlModel(_FakeModel):
    """``shared.sd_model`` for SDXL (sgm ``DiffusionEngine`` + ``extend_sdxl``)."""

    is_sdxl = True

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.model = OpenAIWrapper(pipe.unet)
        te1 = pipe.text_encoder
        clip_l = FrozenCLIPEmbedder(te1, pipe.tokenizer, "hidden", te1.config.num_hidden_layers - 1)
        big_g = FrozenOpenCLIPEmbedder2(from_hf_clip(pipe.text_encoder_2))
        time_dim = pipe.unet.config.addition_time_embed_dim
        self.conditioner = GeneralConditioner(
            [
                FrozenCLIPEmbedderForSDXLWithCustomWords(clip_l),
                FrozenOpenCLIPEmbedder2WithCustomWords(big_g, OpenClipTokenizer(pipe.tokenizer_2)),
                ConcatTimestepEmbedderND(time_dim, "original_size_as_tuple"),
                ConcatTimestepEmbedderND(time_dim, "crop_coords_top_left"),
                ConcatTimestepEmbedderND(time_dim, "target_size_as_tuple"),
            ]
        )
        self.cond_stage_model = self.conditioner
        embedders = [
            (f"{i}_", e.wrapped)
            for i, e in enumerate(self.conditioner.embedders)
            if hasattr(e, "wrapped")
        ]
        self._map_networks([("", self.model), *embedders])

    def get_learned_conditioning(self, batch: list[str]) -> dict[str, torch.Tensor]:
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        n = len(batch)
        conds = {
            "txt": list(batch),
            "original_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
            "crop_coords_top_left": torch.tensor([0, 0]).repeat(n, 1),
            "target_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
        }
        return self.conditioner(conds)

    def apply_model(self, x, t, cond):
        self.apply_calls += 1
        return self.model(x, t, cond)


def fake_sd_model(pipe: Any, arch: Architecture) -> _FakeModel:
    """The A1111 model of ``arch`` around a tiny pipeline of that architecture."""
    cls = {
        Architecture.SD1: FakeSdModel,
        Architecture.SD2: FakeSd2Model,
        Architecture.SDXL: FakeSdxlModel,
    }[Architecture(arch)]
    return cls(pipe)
