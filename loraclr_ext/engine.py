"""The one entry point every front end calls: check → host → plan → collect → solve →
report → write, then (when asked) :func:`add_preview` draws the preview grid.

:func:`merge` is what the command line and the WebUI call. ``run_merge`` never writes host
weights (concepts are applied by hooks inside the host's ``clean_weights`` context) and writes
its output only after everything else succeeded, through an atomic rename; on any error or
interrupt nothing is left behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch

from loraclr_ext import __version__
from loraclr_ext.errors import (
    InvalidInputError,
    LoraClrError,
    MergeInterruptedError,
    OutOfMemoryMergeError,
)
from loraclr_ext.hosts.base import Host
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.lowrank import pad_rank
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.collect import collect, new_stats, recording_steps
from loraclr_ext.pipeline.memory import plan_memory
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
from loraclr_ext.pipeline.plan import MergePlan, plan_merge, precheck
from loraclr_ext.pipeline.progress import InPasses, Progress, SilentProgress, check_interrupt
from loraclr_ext.preview.cells import PREVIEW_CFG, preview_cells, preview_steps
from loraclr_ext.preview.grid import PreviewGrid, Renderer, render_grid
from loraclr_ext.report.quality import REPORT_BATCH, QualityReport, evaluate
from loraclr_ext.solver import LayerStats, SolverSettings, solve_layer

log = logging.getLogger("loraclr")
T = TypeVar("T")
MAX_UNET_BATCH = REPORT_BATCH
"""The most latents any stage sends through the UNet at once when the host sets no limit
(the report's batch, and the recording's at 256 px); the first retry halves it."""
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class LayerSummary:
    """How one layer was solved (for the report and for debugging)."""

    ref: str
    rank: int
    exact_rank: int
    energy_kept: float
    output_kept: float
    iterations: int
    repel_active: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class MergeResult:
    """What a merge produced. ``path`` is ``None`` when nothing was written (dry run).

    ``options`` are the options the merge ran with, ``steps`` and ``size`` resolved for the
    device; ``auto`` names those that were left on auto (see :meth:`recording_summary`).
    """

    path: Path | None
    factors: dict[ModuleRef, ModuleDelta]
    layers: list[LayerSummary]
    triggers: list[str]
    seconds: dict[str, float]
    report: QualityReport | None = None
    skipped: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    """File name → what of it was not merged, by kind (side parts, …)."""
    options: MergeOptions | None = None
    auto: list[str] = field(default_factory=list)
    device: str = ""
    concepts: list[ConceptSpec] = field(default_factory=list)
    """The concepts merged: file, prompt, strength, in order."""
    notes: list[str] = field(default_factory=list)
    """What the merge had to adapt to, in words (e.g. a retry after running out of memory)."""
    preview: PreviewGrid | None = None
    preview_note: str = ""
    """Why there is no preview although one was asked for (stopped, failed), or ""."""

    def recording_summary(self) -> str:
        """The recording run's steps and size, and which the device chose, in one line."""
        if self.options is None:
            return ""
        text = f"recorded {self.options.steps} steps at {self.options.size} px"
        if self.auto:
            text += f" ({' and '.join(self.auto)} auto for {self.device or 'this device'})"
        return text

    def rank_summary(self) -> str:
        """Ranks written, and what a target rank kept (worst layer), in one line."""
        ranks = [layer.rank for layer in self.layers]
        text = f"{len(self.layers)} modules, rank {min(ranks)}–{max(ranks)}"
        cut = [layer for layer in self.layers if layer.rank < layer.exact_rank]
        if cut:
            energy = min(layer.energy_kept for layer in cut)
            output = min(layer.output_kept for layer in cut)
            text += (
                f"; {len(cut)} layers reduced: worst layer kept {energy:.1%} of the delta's "
                f"energy and {output:.1%} of its output"
            )
        return text

    @property
    def prompt_tag(self) -> str:
        """What to type in a prompt: ``<lora:NAME:1>`` plus the concepts' trigger words."""
        name = self.path.stem if self.path else "merged"
        return ", ".join([f"<lora:{name}:1>", *self.triggers])


def merge(
    specs: Sequence[ConceptSpec],
    options: MergeOptions,
    output: Path,
    open_host: Callable[[], Host],
    progress: Progress | None = None,
    *,
    check_shapes: bool = True,
) -> MergeResult:
    """Check the request, open the host, read the LoRAs, merge and write ``output``.

    Every check that needs no model runs before ``open_host`` (which may load a checkpoint);
    the LoRAs are read against the host's architecture before anything runs on it.

    Args:
        specs: the concepts, in order.
        options: the user's options (``options.output`` is informational; ``output`` is the
            file written).
        output: the ``.safetensors`` path to write.
        open_host: makes the host (loads or waits for the model); called once, after the
            cheap checks.
        progress: stage/step reporting and interrupt polling.
        check_shapes: require real-model shapes (``False`` for miniature test models).

    Raises:
        LoraClrError: bad input (before any model work), no model, interrupt.
        OutOfMemoryMergeError: the device ran out of memory; the message says what to lower.
    """
    needs_base = precheck(list(specs), options, output, check_shapes=check_shapes)
    host = open_host()
    if needs_base:  # DoRA: its change is baked with the clean base weights
        with torch.no_grad(), host.clean_weights():
            plan = plan_merge(
                list(specs),
                options,
                host.architecture,
                output,
                check_shapes=check_shapes,
                base_weight=host.base_weight,
            )
    else:
        plan = plan_merge(
            list(specs), options, host.architecture, output, check_shapes=check_shapes
        )
    ran = options.resolved(host.device)
    try:
        return run_merge(plan, host, progress)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemoryMergeError(
            f"Out of {_memory_kind(host.device)} memory during the merge (size {ran.size}, "
            f"steps {ran.steps}). Lower the image size, set a target rank, or turn off the "
            "quality report, then try again. Nothing was written."
        ) from exc


def _memory_kind(device: torch.device) -> str:
    """What ran out, in the user's words: an accelerator's memory is "GPU" memory."""
    return "CPU" if device.type == "cpu" else "GPU"


def run_merge(
    plan: MergePlan, host: Host, progress: Progress | None = None, *, write: bool = True
) -> MergeResult:
    """Merge ``plan``'s concepts on ``host``'s loaded model and (optionally) write the file.

    Options left on auto (``steps``, ``size``) are resolved for ``host.device`` first.
    """
    progress = progress or SilentProgress()
    auto = plan.options.auto
    plan = replace(plan, options=plan.options.resolved(host.device))
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    try:
        with torch.no_grad(), host.clean_weights():
            modules, skipped = _target_modules(plan, host)
            shapes = {ref: flat_shape(module) for ref, module in modules.items()}
            _check_shapes(plan, shapes)
            notes: list[str] = []
            memory = plan_memory(plan, shapes, host.device, host.dtype)
            _limit_batch(host, memory.unet_batch)
            log.info("LoRACLR: %s", memory.summary())
            if len(memory.passes) > 1:
                notes.append(memory.summary() + ".")
            staged = _pass_progress(plan, memory.passes, progress)
            factors: dict[ModuleRef, ModuleDelta] = {}
            least_squares: dict[ModuleRef, ModuleDelta] = {}
            layers: list[LayerSummary] = []
            for refs in memory.passes:

                def record(refs: list[ModuleRef] = refs) -> dict[ModuleRef, LayerStats]:
                    stats = new_stats(plan, shapes, host.device, refs)  # fresh on every try
                    collect(plan, host, modules, stats, staged)
                    return stats

                stats = within_memory(host, record, notes)
                clock = _lap(seconds, "collect", clock)
                solved = _solve(plan, stats, host, staged)
                del stats  # each layer's statistics were freed once it was solved
                factors.update(solved[0])
                layers.extend(solved[1])
                least_squares.update(solved[2])
                clock = _lap(seconds, "solve", clock)
            report = None
            if plan.options.quality:
                check_interrupt(progress)
                report = within_memory(
                    host,
                    lambda: evaluate(plan, host, modules, factors, least_squares, progress),
                    notes,
                )
            clock = _lap(seconds, "report", clock)
    finally:
        _free_memory(host.device)  # the WebUI's next generation gets the cache back
    check_interrupt(progress)
    triggers = _triggers(plan)
    path = _write(plan, factors, triggers, layers) if write else None
    _lap(seconds, "write", clock)
    return MergeResult(
        path=path,
        factors=factors,
        layers=layers,
        triggers=triggers,
        seconds=seconds,
        report=report,
        skipped=skipped,
        unmatched={
            c.lora.path.name: "; ".join(c.lora.notes) for c in plan.concepts if c.lora.notes
        },
        options=plan.options,
        auto=auto,
        device=host.device.type,
        concepts=[ConceptSpec(c.lora.path, c.prompt, c.strength) for c in plan.concepts],
        notes=notes,
    )


def within_memory(host: Host, run: Callable[[], T], notes: list[str]) -> T:
    """``run()``, and after an out-of-memory error ``run()`` again with half as many
    latents per UNet call (``host.max_batch``), down to one; the retry is said in
    ``notes``. ``run`` must start from scratch each time (it does: fresh statistics, a
    stateless report). Results do not depend on the batch
    (:func:`~loraclr_ext.hosts.base.in_batches`).

    Raises:
        torch.OutOfMemoryError: still out of memory with one latent per call.
    """
    while True:
        try:
            return run()
        except torch.OutOfMemoryError:
            before = host.max_batch or MAX_UNET_BATCH
            if before <= 1:
                raise
            _free_memory(host.device)
            host.max_batch = before // 2
            images = "image" if host.max_batch == 1 else "images"
            message = (
                f"Out of {_memory_kind(host.device)} memory with {before} images per UNet call; "
                f"ran again with {host.max_batch} {images} per call."
            )
            log.warning("LoRACLR: %s", message)
            notes.append(message)


def _free_memory(device: torch.device) -> None:
    """Give the finished (or failed) try's memory back: to the device's cache for the next
    try or the WebUI's next generation, and on a Linux CPU to the system (glibc keeps freed
    heap pages: an SDXL CPU merge peaked at 9.5 GB resident for 2.0 GB of live tensors)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
    elif device.type == "cpu":
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to give back
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def add_preview(
    result: MergeResult,
    renderer: Renderer,
    progress: Progress | None = None,
    *,
    steps: int | None = None,
) -> MergeResult:
    """Draw the preview grid of a written merge (:mod:`loraclr_ext.preview`) into
    ``result.preview``, on the loaded checkpoint through the host's ``renderer``.

    The merge already succeeded, so nothing here fails it: an Interrupt or an error while
    drawing leaves ``result.preview`` empty and says why in ``result.preview_note`` (an
    unexpected error is logged with its traceback). ``steps`` overrides the device's
    default sampler steps; the size is the recording run's and the seed the merge's.
    """
    if result.path is None or result.options is None:
        raise InvalidInputError("Nothing was written; there is no merged LoRA to preview.")
    size = result.options.size or 512
    try:
        result.preview = render_grid(
            preview_cells(result.concepts, result.path),
            renderer,
            progress or SilentProgress(),
            seed=result.options.seed,
            steps=preview_steps(result.device or "cpu", steps),
            size=size,
            cfg=PREVIEW_CFG,
        )
        result.seconds["preview"] = result.preview.seconds
    except MergeInterruptedError as exc:
        result.preview_note = str(exc)
    except LoraClrError as exc:
        result.preview_note = f"No preview: {exc} The merged LoRA was saved."
    except Exception as exc:  # the file is written; a broken preview must not hide that
        log.exception("LoRACLR preview failed")
        result.preview_note = (
            f"No preview ({type(exc).__name__}: {exc}); see the console. The merged LoRA was saved."
        )
    return result


def _target_modules(
    plan: MergePlan, host: Host
) -> tuple[dict[ModuleRef, torch.nn.Module], list[str]]:
    refs = plan.refs
    found = host.modules(refs)
    missing = [str(r) for r in refs if r not in found]
    if len(missing) > 0.1 * len(refs):
        raise InvalidInputError(
            f"{len(missing)} of {len(refs)} LoRA modules are not in the loaded model "
            f"(e.g. {missing[0]}); is the checkpoint of the LoRAs' architecture?"
        )
    return found, missing


def flat_shape(module: torch.nn.Module) -> tuple[int, int]:
    """``(out, in·kh·kw)`` of a module's weight, without copying it."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise InvalidInputError(f"{type(module).__name__} has no weight tensor to merge into.")
    return int(weight.shape[0]), int(weight[0].numel())


def _check_shapes(plan: MergePlan, shapes: Mapping[ModuleRef, tuple[int, int]]) -> None:
    for concept in plan.concepts:
        for ref, delta in concept.deltas.items():
            if ref not in shapes:
                continue
            shape = (delta.out_features, delta.in_features)
            if shapes[ref] != shape:
                raise InvalidInputError(
                    f"{concept.lora.path.name}: module {ref} has shape {shape} in the LoRA but "
                    f"{shapes[ref]} in the loaded model; the LoRA was trained for "
                    "another model size."
                )


def _solve(
    plan: MergePlan,
    stats: MutableMapping[ModuleRef, LayerStats],
    host: Host,
    progress: Progress,
) -> tuple[dict[ModuleRef, ModuleDelta], list[LayerSummary], dict[ModuleRef, ModuleDelta]]:
    """Solve every layer; also the least-squares baseline when a report is wanted."""
    settings = plan.options.solver_settings()
    ls_settings = SolverSettings(objective="least_squares")
    progress.stage("Solving layers", len(stats))
    factors, least_squares, layers = {}, {}, []
    for ref in list(stats):
        check_interrupt(progress)
        # Statistics stay on the device only until their layer is solved.
        layer_stats = stats.pop(ref)
        # One base weight at a time: copies of them all would cost GBs (SD1.5: ~2.4 GB fp32).
        base = host.base_weight(ref).to(layer_stats.device)
        ups = [_up(c.deltas.get(ref), base.shape[0]) for c in plan.concepts]
        solution = solve_layer(layer_stats, ups, base, settings, layer=str(ref))
        kernel = _kernel(plan, ref)
        factors[ref] = ModuleDelta(solution.up.cpu(), solution.down.cpu(), kernel)
        if plan.options.quality:
            ls = solve_layer(layer_stats, ups, base, ls_settings, layer=str(ref))
            least_squares[ref] = ModuleDelta(ls.up.cpu(), ls.down.cpu(), kernel)
        layers.append(
            LayerSummary(
                str(ref),
                solution.rank,
                solution.exact_rank,
                solution.energy_kept,
                solution.output_kept,
                solution.iterations,
                solution.repel_active,
                solution.notes,
            )
        )
        progress.advance()
    return factors, layers, least_squares


def _up(delta: ModuleDelta | None, out: int) -> torch.Tensor:
    return torch.zeros(out, 0) if delta is None else delta.up.float()


def _kernel(plan: MergePlan, ref: ModuleRef) -> tuple[int, int] | None:
    for concept in plan.concepts:
        if ref in concept.deltas:
            return concept.deltas[ref].kernel
    return None


def _triggers(plan: MergePlan) -> list[str]:
    """Each concept's prompt, which holds its trigger words, in concept order."""
    return [c.prompt for c in plan.concepts]


def _write(
    plan: MergePlan,
    factors: dict[ModuleRef, ModuleDelta],
    triggers: list[str],
    layers: list[LayerSummary],
) -> Path:
    from loraclr_ext.files.metadata import LoraMetadata
    from loraclr_ext.files.write import write_lora

    recipe = {
        "version": __version__,
        "method": "loraclr",
        "concepts": [
            {
                "file": c.lora.path.name,
                "sha256": c.lora.sha256,
                "prompt": c.prompt,
                "strength": c.strength,
            }
            for c in plan.concepts
        ],
        "options": plan.options.to_dict(),
        "rank": max((layer.rank for layer in layers), default=0),
    }
    rank = max((f.rank for f in factors.values()), default=0)
    uniform = {
        ref: ModuleDelta(*pad_rank(f.up, f.down, rank), f.kernel) for ref, f in factors.items()
    }
    tags = [
        c.lora.metadata["ss_tag_frequency"]
        for c in plan.concepts
        if "ss_tag_frequency" in c.lora.metadata
    ]
    return write_lora(
        plan.output,
        uniform,
        plan.architecture,
        LoraMetadata(
            title=plan.output.stem,
            triggers=triggers,
            sources=[(c.lora.path.name, c.lora.sha256) for c in plan.concepts],
            tag_frequency=tags,
            recipe=recipe,
            description="LoRACLR merge of " + ", ".join(c.name for c in plan.concepts),
        ),
        dtype=DTYPES[plan.options.precision],
        overwrite=plan.options.overwrite,
        check_shapes=False,  # shapes were checked against the loaded model itself
    )


def _lap(seconds: dict[str, float], stage: str, since: float) -> float:
    """Add the time since ``since`` to ``seconds[stage]`` (passes add up); returns now."""
    now = time.perf_counter()
    seconds[stage] = round(seconds.get(stage, 0.0) + now - since, 3)
    return now


def _limit_batch(host: Host, batch: int | None) -> None:
    """Lower ``host.max_batch`` to what the memory budget allows (never raise it: an
    earlier out-of-memory retry may have lowered it further)."""
    if batch is not None and batch < (host.max_batch or MAX_UNET_BATCH):
        host.max_batch = batch


def _pass_progress(plan: MergePlan, passes: list[list[ModuleRef]], progress: Progress) -> Progress:
    """``progress`` itself for one pass; for several, one stage over all of them."""
    if len(passes) == 1:
        return progress
    total = sum(recording_steps(plan, refs) + len(refs) for refs in passes)
    return InPasses(progress, total, len(passes))
