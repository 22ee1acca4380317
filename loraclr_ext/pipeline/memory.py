"""The merge's memory budget: how much device memory it may use beyond the loaded model, and
how the recording is split to stay within it.

Almost all of a merge's extra memory is the layers' statistics (``LayerStats.footprint``:
SD 1.5 with 12 rank-16 LoRAs ≈ 0.75 GB in fp16, SDXL ≈ 4 GB); the UNet's activations at
the recording size are small beside them (SD 1.5: ≈ 8.3 kB per latent pixel and byte of
dtype, 65 MiB per fp16 latent at 512 px, measured by ``bench/live_bytes.py``). When the
statistics do not fit, the layers are recorded and solved in passes — each pass runs every
concept again but keeps only its layers' statistics — so a small budget costs time, not a
failure. The UNet batch is set from what is left.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraclr_ext.errors import InvalidInputError
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.collect import basis_rows, recording_latents
from loraclr_ext.pipeline.plan import MergePlan
from loraclr_ext.solver import LayerStats

ACTIVATION_BYTES = {Architecture.SD1: 8_400, Architecture.SDXL: 5_500}
"""Peak UNet activation bytes per latent pixel per byte of the model's dtype, one latent,
no gradients, PyTorch's own attention (``bench/live_bytes.py`` on the real configs with
random weights: SD 1.5 8.3 k at 128 and 256 px in fp32; SDXL 5.4 k at 64 px and 5.1 k at
128 px in bf16, one or two latents alike). SDXL needs less per pixel: its full-resolution
level has no attention. Flat in size, as PyTorch's attention keeps no token×token
matrix. Other architectures use the largest."""
MAX_PASSES = 16
"""More passes than this would run the recording 16 times: the budget is refused instead."""
RESERVE = 0.10
"""Share of an accelerator's total memory left free when the budget is automatic (the
WebUI's next generation and other programs need some)."""
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """How a merge stays within ``budget`` bytes beyond the loaded model.

    ``passes`` lists the layers recorded together (one list: the usual single pass);
    ``unet_batch`` is the most latents per UNet call (``None``: no limit needed);
    ``stats`` the statistics' bytes over all layers, ``largest_pass`` those of the
    largest pass.
    """

    budget: int | None
    source: str
    stats: int
    largest_pass: int
    passes: list[list[ModuleRef]]
    unet_batch: int | None

    def summary(self) -> str:
        """One line for the log and the result's notes."""
        budget = "no limit" if self.budget is None else in_words(self.budget)
        text = f"Memory budget {budget} ({self.source}); statistics {in_words(self.stats)}"
        if len(self.passes) > 1:
            text += (
                f", recorded in {len(self.passes)} passes of at most "
                f"{in_words(self.largest_pass)} (each pass runs every concept again)"
            )
        if self.unet_batch is not None:
            images = "image" if self.unet_batch == 1 else "images"
            text += f"; at most {self.unet_batch} {images} per UNet call"
        return text


def in_words(size: int, up: bool = False) -> str:
    """Bytes as the user reads them: ``"1.25 GB"``, or ``"340 MB"`` below a gigabyte.
    ``up``: rounded up, for a least amount (a budget of what it says is then enough)."""
    if size >= GIB:
        value = size / GIB
        if up:
            value = math.ceil(value * 100) / 100
        return f"{value:.2f} GB"
    value = max(size / 2**20, 0.01)
    if up:
        scale = 10.0 ** (2 - math.floor(math.log10(value)))  # three significant digits
        value = math.ceil(value * scale) / scale
    return f"{value:.3g} MB"


def layer_bytes(
    plan: MergePlan, shapes: Mapping[ModuleRef, tuple[int, int]], sample_bytes: int
) -> dict[ModuleRef, int]:
    """Each layer's statistics in bytes (:meth:`LayerStats.footprint`), in ``plan.refs``
    order, with the basis size ``new_stats`` will use."""
    out = {}
    for ref in plan.refs:
        if ref not in shapes:  # not in the loaded model: skipped, never recorded
            continue
        fan_in = shapes[ref][1]
        ranks = [c.deltas[ref].rank if ref in c.deltas else 0 for c in plan.concepts]
        out[ref] = LayerStats.footprint(
            fan_in, ranks, basis_rows(plan, ref, fan_in), sample_bytes=sample_bytes
        )
    return out


def latent_bytes(architecture: Architecture, size: int, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes of one latent of ``size`` px through the UNet."""
    per_pixel = ACTIVATION_BYTES.get(architecture, max(ACTIVATION_BYTES.values()))
    return per_pixel * (size // 8) ** 2 * dtype.itemsize


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes the merge may take on ``device`` when the user set no budget, and whence.

    CUDA: free memory plus what PyTorch holds cached but unused, less ``RESERVE`` of the
    total. MPS: the recommended working set less what is allocated. CPU: ``MemAvailable``
    (Linux) less the reserve; ``None`` (no limit) where the system does not say.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(int(free + cached - RESERVE * total), 0), "free GPU memory"
    if device.type == "mps":
        try:  # both calls are recent (PyTorch 2.3+)
            limit = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        except (AttributeError, RuntimeError):
            return None, "no limit known"
        return max(int(limit * (1 - RESERVE)), 0), "free GPU memory"
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                return int(free * (1 - RESERVE)), "available RAM"
    return None, "no limit known"


def plan_memory(
    plan: MergePlan,
    shapes: Mapping[ModuleRef, tuple[int, int]],
    device: torch.device,
    dtype: torch.dtype,
) -> MemoryPlan:
    """Split ``plan``'s layers into recording passes and choose the UNet batch so that the
    statistics of one pass plus the activations stay within the budget
    (``plan.options.memory_budget`` GB, or :func:`available_memory` when it is 0).

    Raises:
        InvalidInputError: the budget is too small for the largest layer and one latent,
            or would need more than ``MAX_PASSES`` passes; the message says what is needed.
    """
    requested = plan.options.memory_budget
    if requested:
        budget: int | None = int(requested * GIB)
        source = "set by the user"
    else:
        budget, source = available_memory(device)
    sizes = layer_bytes(plan, shapes, dtype.itemsize)  # row samples keep the model's dtype
    total = sum(sizes.values())
    size = plan.options.size or 512
    latent = latent_bytes(plan.architecture, size, dtype)
    refs = list(sizes)
    if budget is None or total + recording_latents(size) * latent <= budget:
        return MemoryPlan(budget, source, total, total, [refs], None)
    room = budget - latent
    largest = max(sizes.values(), default=0)
    passes = _group(refs, sizes, room) if room >= largest else []
    if not passes or len(passes) > MAX_PASSES:
        least = _least_room(refs, sizes, max(largest, math.ceil(total / MAX_PASSES)))
        raise InvalidInputError(
            f"The merge needs at least {in_words(least + latent, up=True)} of memory (its "
            f"layers' statistics, {in_words(total)}, in at most {MAX_PASSES} passes, and one "
            f"image), but the budget is {in_words(budget)} ({source}). Raise the memory "
            "budget or free memory, merge fewer LoRAs, or lower the image size."
        )
    largest_pass = max(sum(sizes[r] for r in group) for group in passes)
    batch = max(1, (budget - largest_pass) // max(latent, 1))
    return MemoryPlan(budget, source, total, largest_pass, passes, int(batch))


def _group(
    refs: Sequence[ModuleRef], sizes: Mapping[ModuleRef, int], room: int
) -> list[list[ModuleRef]]:
    """Consecutive runs of ``refs`` whose sizes sum to at most ``room`` (each at least one)."""
    groups: list[list[ModuleRef]] = [[]]
    used = 0
    for ref in refs:
        if groups[-1] and used + sizes[ref] > room:
            groups.append([])
            used = 0
        groups[-1].append(ref)
        used += sizes[ref]
    return groups


def _least_room(refs: Sequence[ModuleRef], sizes: Mapping[ModuleRef, int], low: int) -> int:
    """The least room (bytes) in which :func:`_group` makes at most ``MAX_PASSES`` passes.

    Whole layers go into each pass, so it can be well above ``total / MAX_PASSES``. The pass
    count never rises with the room (a pass never ends sooner given more room), so a
    bisection between ``low`` (too small) and the total finds it exactly.
    """
    high = sum(sizes[r] for r in refs)
    while low < high:
        mid = (low + high) // 2
        if len(_group(refs, sizes, mid)) <= MAX_PASSES:
            high = mid
        else:
            low = mid + 1
    return high
