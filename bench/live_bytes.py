"""Exact peak of tensor memory allocated inside a block, on one device (a dispatch mode).

RSS sampling (``bench.measure``) sees the allocator's caches and heap fragmentation too; this
counts only live tensor storages created inside the block, so tests can assert a peak to the
byte. Storages that existed before the block (model weights, their views) are not counted.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes("cpu") as live: ...`` then ``live.peak`` (bytes) and ``live.now``.

    A storage counts from the op that allocated it until every tensor seen on it is gone.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.now = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device.type:
                self._track(t, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._live.get(key)
        if entry is None:
            if key in inputs:  # a view or in-place result of a storage made before the block
                return
            entry = self._live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self.now -= entry[0]
