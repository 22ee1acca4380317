"""Separate q / k / v / out modules for ``torch.nn.MultiheadAttention``, so forward hooks
can see and change each projection.

open_clip's text transformers (SD 2.x, SDXL's OpenCLIP-bigG) keep q, k and v fused in one
``in_proj_weight [3C, C]`` and call ``F.multi_head_attention_forward``, which slices that
tensor and applies ``out_proj`` with ``F.linear``: no submodule is ever called, so a
forward hook has nothing to attach to. :func:`explicit_attention` gives each MHA, for the
duration of a ``with`` block, an instance ``forward`` that computes the same attention
through small :class:`FusedProjection` modules whose weights are *views* of the fused
slices (no copies, no writes) and through the real ``out_proj`` called as a module. Hooks
on those modules see the true projection inputs, batch first ``[B, T, C]``, and may add to
their outputs. The class ``forward`` is never touched; the instance attribute is removed
(or the one found there put back) when the block exits, also on error.

open_clip 2.x runs its text transformer sequence first (``[T, B, C]``), so the MLP
Linears see ``[T, B, C]`` too; :func:`batch_first_calls` runs a position-wise module (the
block's ``mlp``) on its input transposed to ``[B, T, C]``, which changes no number but lets
hooks on ``c_fc`` / ``c_proj`` see the same layout as the projections.

torch only: nothing here knows about WebUIs or LoRAs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loraclr_ext.hosts.weights import readable

_SLOTS = {"q": 0, "k": 1, "v": 2}
_MISSING = object()


class FusedProjection(torch.nn.Module):
    """One of q / k / v of a ``MultiheadAttention``, as a Linear-like module.

    ``weight`` ``[C, C]`` and ``bias`` ``[C]`` are views of rows ``[slot·C, (slot+1)·C)`` of
    the MHA's ``in_proj_weight`` / ``in_proj_bias``, read at every access, so they follow
    in-place changes (e.g. the Lora extension's merge) and never hold memory of their own.
    The MHA is not registered as a child: the proxy owns no parameters, so it adds nothing
    to ``state_dict``, ``parameters()`` or a weights fingerprint of the model.
    """

    # Set with object.__setattr__ (not registered as a child); declared so the type checker
    # sees an MHA instead of nn.Module.__getattr__'s ``Tensor | Module``.
    _mha: torch.nn.MultiheadAttention

    def __init__(self, mha: torch.nn.MultiheadAttention, slot: str) -> None:
        super().__init__()
        self.slot = slot
        self.index = _SLOTS[slot]
        object.__setattr__(self, "_mha", mha)

    @property
    def weight(self) -> torch.Tensor:
        """``[C, C]`` view of the fused ``in_proj_weight`` (out × in)."""
        e = self._mha.embed_dim
        return readable(self._mha.in_proj_weight)[self.index * e : (self.index + 1) * e]

    @property
    def bias(self) -> torch.Tensor | None:
        """``[C]`` view of the fused ``in_proj_bias``, or ``None``."""
        b = self._mha.in_proj_bias
        e = self._mha.embed_dim
        return None if b is None else readable(b)[self.index * e : (self.index + 1) * e]

    @property
    def in_features(self) -> int:
        return self._mha.embed_dim

    @property
    def out_features(self) -> int:
        return self._mha.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., C] → [..., C]``. Weights stored in another dtype than ``x`` (fp8
        storage, manual casting) are cast on the fly; a copy, never a write."""
        weight, bias = self.weight, self.bias
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"slot={self.slot}, features={self._mha.embed_dim}"


@dataclass(frozen=True)
class AttentionProjections:
    """The four hookable projections of one MHA: q / k / v proxies and its real ``out_proj``."""

    q: FusedProjection
    k: FusedProjection
    v: FusedProjection
    out: torch.nn.Module

    def by_name(self, name: str) -> torch.nn.Module:
        """``"q" | "k" | "v" | "out"`` → the module."""
        return {"q": self.q, "k": self.k, "v": self.v, "out": self.out}[name]


def projections(mha: torch.nn.MultiheadAttention) -> AttentionProjections:
    """Hookable projections of ``mha``.

    Raises:
        ValueError: an MHA layout open_clip does not use (separate q/k/v weights,
            ``add_bias_kv``, ``add_zero_attn``), which :func:`explicit_forward` does not model.
    """
    if not getattr(mha, "_qkv_same_embed_dim", False) or mha.in_proj_weight is None:
        raise ValueError("MultiheadAttention with separate q/k/v weights is not supported.")
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise ValueError("MultiheadAttention with add_bias_kv / add_zero_attn is not supported.")
    return AttentionProjections(
        FusedProjection(mha, "q"),
        FusedProjection(mha, "k"),
        FusedProjection(mha, "v"),
        mha.out_proj,
    )


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not attended) as an additive float mask in ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def explicit_forward(
    mha: torch.nn.MultiheadAttention,
    proj: AttentionProjections,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``mha.forward`` computes, with q/k/v/out applied as modules.

    Same signature and result as ``MultiheadAttention.forward``: inputs ``[L, B, C]`` (or
    ``[B, L, C]`` with ``batch_first``, or unbatched ``[L, C]``); ``attn_mask`` ``[L, S]`` or
    ``[B·H, L, S]``, boolean (True = masked) or additive float; ``key_padding_mask``
    ``[B, S]``. Returns ``(output, weights)``; weights ``[B, L, S]`` (averaged over heads)
    or ``[B, H, L, S]`` when ``need_weights``, else ``None``. Like the library with
    ``need_weights=False`` it uses ``scaled_dot_product_attention``; the projections always
    receive batch-first ``[B, T, C]``.
    """
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    # Now [L, B, C] as in F.multi_head_attention_forward; projections want [B, L, C].
    length, batch, embed = query.shape
    heads = mha.num_heads
    head_dim = embed // heads
    q = proj.q(query.transpose(0, 1))
    k = proj.k(key.transpose(0, 1))
    v = proj.v(value.transpose(0, 1))
    src = k.shape[1]

    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    use_causal = is_causal and key_padding_mask is None and not need_weights
    mask = None if use_causal else _float_mask(attn_mask, q.dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(batch, heads, length, src)
    padding = _float_mask(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, src)
        mask = padding if mask is None else mask + padding

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, H, T, D]
        return t.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    qh, kh, vh = split(q), split(k), split(v)
    dropout = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = (qh * head_dim**-0.5) @ kh.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        attended = F.dropout(weights, p=dropout) if dropout > 0 else weights
        context = attended @ vh
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        context = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, dropout_p=dropout, is_causal=use_causal
        )
    out = proj.out(context.transpose(1, 2).reshape(batch, length, embed))  # [B, L, C]
    if unbatched:
        out = out.squeeze(0)
        weights = None if weights is None else weights.squeeze(0)
    elif not mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights


@contextmanager
def explicit_attention(
    pairs: Iterable[tuple[torch.nn.MultiheadAttention, AttentionProjections]],
) -> Iterator[None]:
    """Route every listed MHA through :func:`explicit_forward` inside the block.

    The override is an instance attribute; on exit (normal, error or interrupt) it is
    removed again, or the instance ``forward`` found on entry is put back.
    """
    saved: list[tuple[torch.nn.MultiheadAttention, Any]] = []
    try:
        for mha, proj in pairs:

            def forward(*args: Any, _mha=mha, _proj=proj, **kwargs: Any):
                return explicit_forward(_mha, _proj, *args, **kwargs)

            saved.append((mha, _override(mha, forward)))
        yield
    finally:
        for mha, previous in reversed(saved):
            _restore(mha, previous)


def _override(module: torch.nn.Module, forward: Any) -> Any:
    """Set an instance ``forward``; return what to restore (the previous one or a marker)."""
    previous = module.__dict__.get("forward", _MISSING)
    module.forward = forward
    return previous


def _restore(module: torch.nn.Module, previous: Any) -> None:
    if previous is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


@contextmanager
def batch_first_calls(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Inside the block, call each (position-wise, one-tensor) module on its sequence-first
    input ``[T, B, C]`` transposed to ``[B, T, C]`` and transpose the result back.

    Only for modules that act on every position alone (Linear / activation stacks such as
    open_clip's ``mlp``): for those the output is identical, and their children see
    batch-first inputs. Restored on exit like :func:`explicit_attention`.
    """
    saved: list[tuple[torch.nn.Module, Any]] = []
    try:
        for module in modules:
            call = module.forward  # bound: the class forward or an instance one found here

            def forward(x: torch.Tensor, _call=call) -> torch.Tensor:
                if x.dim() != 3:
                    return _call(x)
                return _call(x.transpose(0, 1)).transpose(0, 1)

            saved.append((module, _override(module, forward)))
        yield
    finally:
        for module, previous in reversed(saved):
            _restore(module, previous)
