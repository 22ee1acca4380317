"""Multi-concept measures of the report: prompts that name two merged concepts together.

Bleeding shows where a prompt names two concepts: each concept's words must keep their own
LoRA's meaning and not pick up the other's. Per concept, at its own trigger tokens inside
the joint prompts, every configuration is compared with what the concept's LoRA alone gives
there — in the text conditioning, and in the cross-attention keys and values computed from
it (where the UNet binds words to image regions). Only text encoders and K/V projections
run, so the measure costs no UNet evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from loraclr_ext.hosts.base import Host
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.naming import module_refs
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.collect import token_roles
from loraclr_ext.pipeline.hooks import applied, delta_output, outside_inference
from loraclr_ext.pipeline.options import JOINT_TEMPLATES
from loraclr_ext.pipeline.plan import is_cross_kv
from loraclr_ext.report.shares import Gram

Deltas = Mapping[ModuleRef, ModuleDelta]


@dataclass(frozen=True)
class JointPrompt:
    """A prompt naming concepts ``first`` and ``second`` (indices into the plan's concepts)."""

    text: str
    first: int
    second: int

    def partner(self, concept: int) -> int:
        return self.second if concept == self.first else self.first


@dataclass
class JointScore:
    """One method's composition numbers for one concept, at its trigger tokens in the joint
    prompts.

    Attributes:
        text: relative error of the conditioning against the concept's LoRA alone on the
            same joint prompt (0 = its own meaning kept exactly, 1 = as far off as no LoRA).
        kv: the same at the cross-attention keys and values, all K/V layers together.
        own: share of the concept's own K/V effect kept there (1 = all).
        bleed: share of the partner concept's K/V effect that lands there (0 = none;
            stacking ≈ 1; negative = pushed away from the partner).
    """

    text: float
    kv: float
    own: float
    bleed: float


def joint_prompts(prompts: list[str]) -> list[JointPrompt]:
    """Joint prompts for concepts with these prompts: each pair of neighbours (0-1, 1-2, …,
    last-0; just 0-1 for two) in both orders, the first order in ``JOINT_TEMPLATES[0]`` and
    the reversed one in ``JOINT_TEMPLATES[1]``, so every concept is named first and second.
    Empty for one concept."""
    n = len(prompts)
    if n < 2:
        return []
    pairs = [(0, 1)] if n == 2 else [(i, (i + 1) % n) for i in range(n)]
    out = [JointPrompt(JOINT_TEMPLATES[0].format(prompts[a], prompts[b]), a, b) for a, b in pairs]
    out += [JointPrompt(JOINT_TEMPLATES[1].format(prompts[b], prompts[a]), b, a) for a, b in pairs]
    return out


@dataclass
class _Rows:
    """The trigger-token rows of the joint prompts: which concept each row belongs to and
    the concept it shares its prompt with."""

    mask: torch.Tensor  # [P, T] bool: any concept's trigger token
    concept: torch.Tensor  # [R] long
    partner: torch.Tensor  # [R] long


def _rows(host: Host, joint: list[JointPrompt], triggers: list[set[int]]) -> _Rows:
    texts = [j.text for j in joint]
    owner: torch.Tensor | None = None
    for i, ids in enumerate(triggers):
        found = token_roles(host, texts, ids).trigger
        if owner is None:
            owner = torch.full(found.shape, -1, dtype=torch.long)
        named = torch.tensor([i in (j.first, j.second) for j in joint])
        owner[found & named[:, None] & (owner < 0)] = i
    assert owner is not None
    pairs = zip(joint, owner.tolist(), strict=True)
    partner = torch.tensor([[j.partner(i) if i >= 0 else -1 for i in row] for j, row in pairs])
    mask = owner >= 0
    return _Rows(mask, owner[mask], partner[mask])


def _encode(
    host: Host,
    modules: Mapping[ModuleRef, torch.nn.Module],
    deltas: Deltas,
    texts: list[str],
    mask: torch.Tensor,
) -> torch.Tensor:
    """The conditioning rows at ``mask [P, T]`` with the text deltas applied: ``[R, D]``.
    A longer conditioning (a WebUI's second 75-token chunk) has no trigger rows there."""
    text = {r: d for r, d in deltas.items() if r.is_text}
    with torch.no_grad(), applied(modules, text):
        context = host.encode(texts).context
    width = context.shape[1]
    if mask.shape[1] < width:
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    return context[mask[:, :width].to(context.device)]


def _kv(module: torch.nn.Module, delta: ModuleDelta | None, rows: torch.Tensor) -> torch.Tensor:
    """A K/V projection of ``rows [R, D]`` with ``delta`` added to its weight: ``[R, out]``."""
    with torch.no_grad():
        out = module(rows)
        if delta is not None and delta.rank > 0:
            with outside_inference():
                out = out + delta_output(module, delta, rows)
    return out.double()


def evaluate_joint(
    host: Host,
    modules: Mapping[ModuleRef, torch.nn.Module],
    prompts: list[str],
    triggers: list[set[int]],
    owns: list[Deltas],
    methods: Mapping[str, Deltas],
    check: Callable[[], None] | None = None,
) -> dict[str, list[JointScore]]:
    """Score every method at each concept's trigger tokens in the joint prompts.

    Args:
        prompts, triggers, owns: per concept, its prompt, its trigger token ids (only its
            own; see ``pipeline.collect.trigger_ids``) and its LoRA's deltas.
        methods: name → merged deltas.
        check: called before each configuration (interrupt polling), if given.

    Returns:
        method name → one :class:`JointScore` per concept (NaN where a concept has no
        trigger token of its own or its LoRA changes nothing there). Empty for one concept.
    """
    joint = joint_prompts(prompts)
    if not joint:
        return {}
    n = len(prompts)
    rows = _rows(host, joint, triggers)
    texts = [j.text for j in joint]
    configs: dict[str, Deltas] = {"": {}}
    configs.update({f"own {i}": d for i, d in enumerate(owns)})
    configs.update({f"method {m}": d for m, d in methods.items()})
    contexts = {}
    for key, deltas in configs.items():
        if check is not None:
            check()
        contexts[key] = _encode(host, modules, deltas, texts, rows.mask)
    text = _grams(contexts, rows, n, methods)
    kv = {m: [Gram() for _ in range(n)] for m in methods}
    wanted = [r for r in module_refs(host.architecture, ("transformer",)) if is_cross_kv(r)]
    for ref, module in host.modules(wanted).items():
        outs = {k: _kv(module, d.get(ref), contexts[k]) for k, d in configs.items()}
        for m, grams in _grams(outs, rows, n, methods).items():
            for total, part in zip(kv[m], grams, strict=True):
                total.include(part)
    scores: dict[str, list[JointScore]] = {}
    for m in methods:
        scores[m] = []
        for i in range(n):
            share = kv[m][i].shares()
            errors = text[m][i].relative_error(), kv[m][i].relative_error()
            scores[m].append(JointScore(*errors, share.own, share.others))
    return scores


def _grams(
    outs: Mapping[str, torch.Tensor], rows: _Rows, n: int, methods: Mapping[str, Deltas]
) -> dict[str, list[Gram]]:
    """Per method and concept, the sums over that concept's rows of ``outs`` (``[R, …]`` per
    configuration, keyed as in :func:`evaluate_joint`)."""
    base = outs[""].double().cpu()
    effect = torch.stack([outs[f"own {i}"].double().cpu() - base for i in range(n)])
    own = effect[rows.concept, torch.arange(len(rows.concept))]
    others = effect[rows.partner, torch.arange(len(rows.partner))]
    grams: dict[str, list[Gram]] = {}
    for m in methods:
        change = outs[f"method {m}"].double().cpu() - base
        grams[m] = []
        for i in range(n):
            sel = rows.concept == i
            gram = Gram()
            gram.add(change[sel], own[sel], others[sel])
            grams[m].append(gram)
    return grams
