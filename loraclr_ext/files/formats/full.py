"""Full weight difference (``diff``): the delta itself, ``[out, in]`` or ``[out, in, kh, kw]``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from loraclr_ext.files.formats.base import Shape, ShapeInfo, kernel_of, require
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.lowrank import factor_dense


class FullDiff:
    """``<module>.diff``; factored exactly by SVD. ``diff_b`` (bias) is reported unmatched."""

    name: ClassVar[str] = "full"
    parts: ClassVar[frozenset[str]] = frozenset({"diff"})

    def shape_info(self, shapes: Mapping[str, Shape]) -> ShapeInfo:
        require(shapes, "diff")
        shape = shapes["diff"]
        flat_in = 1
        for d in shape[1:]:
            flat_in *= int(d)
        return ShapeInfo(int(shape[0]), flat_in, kernel_of(shape), None)

    def build(self, tensors: Mapping[str, torch.Tensor]) -> tuple[ModuleDelta, str]:
        require(tensors, "diff")
        diff = tensors["diff"]
        up, down = factor_dense(diff)
        return ModuleDelta(up=up, down=down, kernel=kernel_of(tuple(diff.shape))), "full"
