"""Streaming input statistics of one layer, for n concepts.

The solver never needs a layer's features, only these sums (design §2.1, fact 2):

* ``gram``      ``G = Σ_i Σ_t w_t z_t z_tᵀ``  ``[d, d]`` over all concepts' rows,
* ``cross[i]``  ``P_i = Σ_t w_t (down_i x_t) z_tᵀ``  ``[r_i, d]``, i.e. ``down_i G_i``,
* ``self_cross[i]``  ``E_i = Σ_t w_t (down_i x_t)(down_i x_t)ᵀ``  ``[r_i, r_i]``,
* ``neutral_gram``  ``G_0`` of neutral (no-trigger) inputs, for base preservation,

where ``z = x`` or, when a ``basis`` ``B [k, in]`` with orthonormal rows is given, ``z = B x``
(used for very wide layers so that memory stays ``O(k²)`` instead of ``O(in²)``).
A bounded, seeded sample of raw rows per concept feeds the repel term and metrics.

Memory depends on the layer's width and the concepts' ranks only — never on how many
tokens, steps or prompts are streamed through ``add``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraclr_ext.errors import SolverError

NEUTRAL = -1
"""Concept index of neutral (base-preservation) inputs."""


class TokenSample:
    """A bounded weighted reservoir of rows (Efraimidis–Spirakis, key ``log(u)/w``).

    The uniform draws depend only on ``(seed, call index, row index)``, so concepts streamed
    with the same shapes in the same order keep the same positions wherever their
    weights agree: the samples are position-aligned across concepts.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seed = seed
        self.calls = 0
        self.rows: torch.Tensor | None = None  # [m, in], in the offered rows' dtype
        self.keys: torch.Tensor | None = None  # [m]

    def offer(self, rows: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Offer ``rows`` ``[t, in]`` with weights ``[t]`` (zero weight: never kept)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        if self.capacity <= 0:
            return
        u = torch.rand(rows.shape[0], generator=gen, dtype=torch.float64).clamp_min(1e-300)
        w = torch.ones_like(u) if weights is None else weights.detach().cpu().double()
        keys = torch.where(w > 0, u.log() / w.clamp_min(1e-300), torch.full_like(u, -torch.inf))
        old = 0 if self.keys is None else int(self.keys.numel())
        all_keys = keys if self.keys is None else torch.cat([self.keys, keys])
        # Choose by key first and gather only the winners: copying every offered row
        # (thousands per UNet call) would cost more than the statistics themselves.
        top = torch.topk(all_keys, min(self.capacity, all_keys.numel())).indices.sort().values
        top = top[all_keys[top] > -torch.inf]
        new = top[top >= old] - old
        picked = rows[new.to(rows.device)]
        if self.rows is not None:
            picked = torch.cat(
                [self.rows[top[top < old].to(self.rows.device)], picked.to(self.rows.device)]
            )
        self.rows, self.keys = picked, all_keys[top]


class LayerStats:
    """Accumulator of one layer's statistics for ``len(downs)`` concepts.

    Args:
        downs: each concept's down factor ``[r_i, in]`` (scale folded in), in concept order.
        basis: optional ``[k, in]`` with orthonormal rows; statistics are then kept in the
            ``k``-dimensional coordinates ``z = B x`` and the solved down lies in its span.
        sample_size: rows kept per concept for the repel term and metrics.
        seed: seed of the row sample (the same for every concept, for alignment).
        device: where the sums live (the host's device).
        dtype: accumulation precision (fp32 default; fp64 for tests and small layers).
    """

    def __init__(
        self,
        downs: Sequence[torch.Tensor],
        *,
        basis: torch.Tensor | None = None,
        sample_size: int = 64,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not downs:
            raise SolverError("LayerStats needs at least one concept's down factor.")
        in_features = int(downs[0].shape[1])
        for i, down in enumerate(downs):
            if down.ndim != 2 or down.shape[1] != in_features:
                raise SolverError(
                    f"Concept {i}'s down factor has shape {tuple(down.shape)}; "
                    f"expected [rank, {in_features}] like concept 0."
                )
        if basis is not None and (basis.ndim != 2 or basis.shape[1] != in_features):
            raise SolverError(f"basis must be [k, {in_features}], got {tuple(basis.shape)}.")
        self.device = torch.device(device)
        self.dtype = dtype
        self.in_features = in_features
        # The concepts' own factors stay where the caller keeps them (the CPU, beside the
        # plan): the solver reads them once per layer. Only what ``add`` multiplies by
        # every call lives on the device: the basis and each down in its coordinates.
        self.downs = [d.detach().to(dtype=dtype) for d in downs]
        self.basis = None if basis is None else basis.detach().to(self.device, dtype)
        self._readers = [self._reader(d) for d in self.downs]
        dim = in_features if basis is None else int(basis.shape[0])
        self.dim = dim
        self.gram = torch.zeros(dim, dim, device=self.device, dtype=dtype)
        self.neutral_gram: torch.Tensor | None = None
        self.neutral_weight = 0.0
        self.cross = [torch.zeros(d.shape[0], dim, device=self.device, dtype=dtype) for d in downs]
        self.self_cross = [
            torch.zeros(d.shape[0], d.shape[0], device=self.device, dtype=dtype) for d in downs
        ]
        self.rows = [0] * len(downs)
        self.weight = [0.0] * len(downs)
        self.samples = [TokenSample(sample_size, seed) for _ in downs]

    def _reader(self, down: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """What turns a batch into ``down x`` on the device: ``down`` itself ``[r, in]``, or,
        when the basis spans it (the engine's case), its coordinates ``down Bᵀ`` ``[r, k]``
        applied to ``z = B x`` — k ≤ Σ r columns instead of ``in``."""
        down = down.to(self.device)
        if self.basis is None or down.numel() == 0:
            return down, False
        coords = down @ self.basis.T
        residual = torch.linalg.matrix_norm(coords @ self.basis - down)
        if residual > 1e-4 * torch.linalg.matrix_norm(down).clamp_min(1e-30):
            return down, False
        return coords, True

    @staticmethod
    def footprint(
        in_features: int,
        ranks: Sequence[int],
        basis_rows: int | None,
        *,
        sample_size: int = 64,
        sample_bytes: int = 4,
        dtype_bytes: int = 4,
    ) -> int:
        """Device bytes a layer's statistics reach once every concept was recorded: the
        Grams ``[d, d]`` (concepts' and neutral), ``cross``/``self_cross``, the basis
        ``[k, in]`` and the downs in its coordinates, and full row samples ``[m, in]`` per
        concept in the activations' dtype (``sample_bytes`` per element) and their fp64
        keys (those stay on the CPU, but are counted)."""
        total_rank = sum(ranks)
        dim = in_features if basis_rows is None else basis_rows
        grams = 2 * dim * dim
        cross = total_rank * dim + sum(r * r for r in ranks)
        basis = 0 if basis_rows is None else basis_rows * in_features
        readers = total_rank * dim
        floats = grams + cross + basis + readers
        samples = len(ranks) * sample_size * (in_features * sample_bytes + 8)
        return floats * dtype_bytes + samples

    @property
    def concepts(self) -> int:
        return len(self.downs)

    def add(self, concept: int, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Stream a batch of concept ``concept``'s input rows ``[t, in]``.

        ``weights`` ``[t]`` (≥ 0) say how much each row counts in the fit; ``None`` = 1.
        ``concept == NEUTRAL`` adds to the base-preservation Gram only.
        """
        x = self._check_rows(rows)
        w = None if weights is None else weights.detach().to(self.device, self.dtype).reshape(-1)
        if w is not None and w.shape[0] != x.shape[0]:
            raise SolverError(f"{w.shape[0]} weights for {x.shape[0]} rows.")
        z = x if self.basis is None else x @ self.basis.T
        zw = z if w is None else z * w[:, None]
        gram = zw.T @ z
        if not torch.isfinite(gram).all():  # any NaN/Inf row reaches this small product
            raise SolverError(
                "Feature rows contain NaN or Inf: the model produced non-finite activations. "
                "Check the base model and LoRA files, or run the merge in fp32."
            )
        if concept == NEUTRAL:
            self.neutral_gram = gram if self.neutral_gram is None else self.neutral_gram + gram
            self.neutral_weight += float(x.shape[0]) if w is None else float(w.sum())
            return
        if not 0 <= concept < self.concepts:
            raise SolverError(f"Concept index {concept} out of range 0..{self.concepts - 1}.")
        self.gram += gram
        reader, in_coords = self._readers[concept]
        a = (z if in_coords else x) @ reader.T  # [t, r_i] = down_i x
        aw = a if w is None else a * w[:, None]
        self.cross[concept] += aw.T @ z
        self.self_cross[concept] += aw.T @ a
        self.rows[concept] += int(x.shape[0])
        self.weight[concept] += float(x.shape[0]) if w is None else float(w.sum())
        # Rows are sampled in the dtype the model made them in: the repel term reads them in
        # fp32 later, and fp16 activations lose nothing kept as fp16 (half the memory).
        kept = rows.detach() if rows.is_floating_point() else x
        self.samples[concept].offer(kept.to(self.device), w)

    def _check_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.ndim != 2 or rows.shape[1] != self.in_features:
            raise SolverError(
                f"Feature rows have shape {tuple(rows.shape)}; "
                f"expected [tokens, {self.in_features}]."
            )
        return rows.detach().to(self.device, self.dtype)

    def check_complete(self, layer: str = "layer") -> None:
        """Raise if any concept streamed no rows (its statistics would be empty)."""
        empty = [i for i, w in enumerate(self.weight) if w <= 0]
        if empty:
            raise SolverError(
                f"{layer}: no input rows were recorded for concept(s) {empty}; "
                "the module never ran for their prompts."
            )
