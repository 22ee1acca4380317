"""Baseline merges the report and the benchmark compare against.

Each returns a dense merged delta ``Δ`` ``[out, in]`` for one layer.
"""

from __future__ import annotations

import torch

from loraclr_ext.solver.settings import OFFICIAL_DEFAULTS, SolverSettings


def stacked(deltas: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_i ΔW_i``: what ``<lora:a:1> <lora:b:1>`` applies."""
    return torch.stack([d.float() for d in deltas]).sum(dim=0)


def average(deltas: list[torch.Tensor]) -> torch.Tensor:
    """``(1/N) Σ_i ΔW_i`` (FedAvg-style weight averaging)."""
    return torch.stack([d.float() for d in deltas]).mean(dim=0)


def official_recipe(
    base_weight: torch.Tensor,
    features: list[torch.Tensor],
    deltas: list[torch.Tensor],
    settings: SolverSettings = OFFICIAL_DEFAULTS,
    *,
    lr: float = 1e-4,
    iterations: int = 50,
    weight_decay: float = 1e-4,
) -> torch.Tensor:
    """The released LoRACLR solver's recipe, written from its description.

    A dense ``offset`` starts at zero; AdamW(lr, weight_decay) runs ``iterations`` steps on
    ``(1/N) Σ_i [pos_i² + max(0, m − neg_i)²] + λ_mse·MSE + λ_reg‖offset‖`` where each
    concept's prediction ``X_i (W0 + offset)ᵀ`` and target are flattened, ``pos_i`` is the
    distance to its own target and ``neg_i`` the smallest distance to another concept's
    target; the lowest-loss offset seen is returned. Full features are held in memory, as
    the original does. (fp32 here; the original adds fp16 autocast on GPUs.)

    Args:
        base_weight: ``W0`` ``[out, in]``.
        features: ``X_i`` ``[rows, in]`` per concept, equal row counts.
        deltas: ``ΔW_i`` ``[out, in]`` per concept.
    """
    x = torch.stack([f.float() for f in features])  # [N, rows, in]
    w0 = base_weight.float()
    targets = torch.stack([xi @ (w0 + d.float()).T for xi, d in zip(x, deltas, strict=True)])
    n = x.shape[0]
    offset = torch.zeros_like(w0, requires_grad=True)
    optimizer = torch.optim.AdamW([offset], lr=lr, weight_decay=weight_decay)
    eye = torch.eye(n, dtype=torch.bool)
    best_loss, best = float("inf"), offset.detach().clone()
    for _ in range(iterations):
        optimizer.zero_grad()
        preds = x @ (w0 + offset).T
        dist = torch.cdist(preds.reshape(n, -1), targets.reshape(n, -1))
        pos = dist.diagonal()
        neg = dist.masked_fill(eye, torch.inf).min(dim=1).values if n > 1 else pos * 0 + torch.inf
        contrastive = (pos.pow(2) + torch.relu(settings.margin - neg).pow(2)).mean()
        mse = (preds - targets).pow(2).mean()
        loss = contrastive + settings.mse * mse + settings.reg * offset.norm()
        if float(loss.detach()) < best_loss:
            best_loss, best = float(loss.detach()), offset.detach().clone()
        loss.backward()
        optimizer.step()
    return best
