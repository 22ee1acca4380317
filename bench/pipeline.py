"""End-to-end benchmark at real SD1.5 or SDXL shapes: ``python -m bench.pipeline [options]``.

Builds a random-weight SD1.5 UNet (859.5 M parameters) and CLIP-L text encoder, or
(``--arch sdxl``) the SDXL UNet (2.6 G) with CLIP-L and OpenCLIP-G, from the configs the
package ships (no download), writes random rank-r concept LoRAs on every text-encoder and
UNet attention / feed-forward / proj module (SD1.5: 72 + 192, as kohya trains them; with
``--locon`` also on the UNet's convs), and runs whole merges, one table row per LoRA count:
read files, text stage, spatial (denoising) stage, solve, quality report, write.

Each row gives the stage times, the peak tensor memory beyond the loaded model on the
device (CUDA's allocator; on a CPU counted exactly by ``bench.live_bytes``), the peak
growth of the process's resident memory (host), the statistics' planned size, and the
solver against the released recipe (AdamW × 50 on kept features) on the same recorded
rows of a few layers. Weights are random, so quality numbers mean nothing here;
``python -m loraclr_ext demo`` measures quality.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bench.live_bytes import LiveBytes
from bench.measure import measure, print_table
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.naming import module_specs

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "loraclr_ext" / "hosts" / "configs"
CONFIGS = CONFIG_ROOT / "sd1"


def build_sdxl(device: torch.device):
    """A random-weight SDXL pipeline (real UNet, CLIP-L and OpenCLIP-G shapes; tiny VAE and
    tokenizers)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    from loraclr_ext.demo.tiny import _tiny_vae, build_tiny_tokenizer

    root = CONFIG_ROOT / "sdxl"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
    te1 = CLIPTextModel(CLIPTextConfig.from_json_file(root / "text_encoder" / "config.json"))
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig.from_json_file(root / "text_encoder_2" / "config.json")
    )
    scheduler = EulerDiscreteScheduler.from_config(
        json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=build_tiny_tokenizer(),
        tokenizer_2=build_tiny_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_sd15(device: torch.device):
    """A random-weight SD1.5 pipeline (real UNet and CLIP-L shapes, tiny VAE and tokenizer)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraclr_ext.demo.tiny import _tiny_vae, build_tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(
        json.loads((CONFIGS / "unet" / "config.json").read_text())
    )
    text = CLIPTextModel(CLIPTextConfig.from_json_file(CONFIGS / "text_encoder" / "config.json"))
    scheduler = DDIMScheduler.from_config(
        json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text,
        tokenizer=build_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def write_random_loras(
    folder: Path,
    count: int,
    rank: int,
    arch: Architecture = Architecture.SD1,
    *,
    locon: bool = False,
    prefix: str = "concept",
) -> list[Path]:
    """``count`` kohya LoRAs of rank ``rank`` on ``arch``'s text and transformer modules
    (and its UNet convs with ``locon``)."""
    from loraclr_ext.files.metadata import LoraMetadata
    from loraclr_ext.files.write import write_lora

    groups = ("text", "transformer", "locon") if locon else ("text", "transformer")
    specs = [s for s in module_specs(arch) if s.group in groups]
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        factors = {}
        for spec in specs:
            up = torch.randn(spec.out_features, rank, generator=g) * 0.02
            down = torch.randn(rank, spec.flat_in, generator=g) / spec.flat_in**0.5
            factors[spec.ref] = ModuleDelta(up, down, spec.kernel)
        path = folder / f"{prefix}{i}.safetensors"
        write_lora(path, factors, arch, LoraMetadata(triggers=[f"tok{i}"]))
        paths.append(path)
    return paths


@dataclass
class Case:
    """One table row: how many LoRAs, with convs or not, and the recording run."""

    concepts: int
    locon: bool = False
    steps: int | None = None
    size: int | None = None

    @property
    def label(self) -> str:
        return f"{self.concepts}{' +convs' if self.locon else ''}"


@dataclass
class Row:
    case: Case
    steps: int
    size: int
    seconds: dict[str, float]
    total: float
    device_peak_mib: float
    host_peak_mib: float
    stats_mib: float
    passes: int
    layers: int
    ours_s: float = 0.0
    recipe_s: float = 0.0
    recipe_layers: int = 0
    objective_ratio: float = float("nan")
    objective_ratio_full: float = float("nan")
    notes: list[str] = field(default_factory=list)


class Stopwatch:
    """Times ``host.encode`` and ``host.sample`` while the merge records: the text and the
    spatial stage."""

    def __init__(self, host, clock: CpuClock) -> None:
        self.host, self.clock = host, clock
        self.text = self.spatial = 0.0

    def _timed(self, fn, slot: str):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.host.device)
                if (self.clock.current or "").startswith("Recording"):
                    setattr(self, slot, getattr(self, slot) + time.perf_counter() - t0)

        return wrapper

    @contextmanager
    def attached(self) -> Iterator[None]:
        self.host.encode = self._timed(type(self.host).encode.__get__(self.host), "text")
        self.host.sample = self._timed(type(self.host).sample.__get__(self.host), "spatial")
        try:
            yield
        finally:
            del self.host.encode, self.host.sample


class FeatureKeeper:
    """Keeps the raw input rows of a few layers while the merge streams them into
    statistics, so the released recipe can run on the very rows the solver summarised."""

    def __init__(self, refs: list, cap_rows: int) -> None:
        self.refs, self.cap = set(refs), cap_rows
        self.rows: dict = {}

    @contextmanager
    def attached(self) -> Iterator[None]:
        import loraclr_ext.engine as engine

        new_stats = engine.new_stats

        def keeping(plan, shapes, device, refs=None):
            stats = new_stats(plan, shapes, device, refs)
            for ref, layer in stats.items():
                if ref in self.refs:
                    kept = self.rows.setdefault(ref, [[] for _ in range(layer.concepts)])
                    layer.add = self._keeping(layer.add, kept)
            return stats

        engine.new_stats = keeping
        try:
            yield
        finally:
            engine.new_stats = new_stats

    def _keeping(self, add, kept):
        def wrapped(concept, rows, weights=None):
            if concept >= 0:
                have = sum(int(r.shape[0]) for r in kept[concept])
                if have < self.cap:
                    kept[concept].append(rows.detach()[: self.cap - have].float().cpu())
            return add(concept, rows, weights)

        return wrapped


def recipe_against_ours(
    keeper: FeatureKeeper, plan, host
) -> tuple[float, float, int, float, float]:
    """On each kept layer's rows, both solvers on the released objective and settings:
    ours from statistics of those rows (closed form + L-BFGS, timed from the statistics),
    with the down factor in the LoRAs' span as a merge writes it, and over every input
    direction as the recipe's dense offset may; the released recipe (AdamW × 50 on the
    rows). Returns (ours s in the span, recipe s, layers, mean objective ours / recipe in
    the span, the same over every direction): below 1, ours reached a lower objective."""
    from loraclr_ext.pipeline.collect import down_span
    from loraclr_ext.solver import OFFICIAL_DEFAULTS, LayerStats, solve_layer
    from loraclr_ext.solver.baselines import official_recipe
    from loraclr_ext.solver.objective import objective_from_features

    device = host.device
    ours = recipe = 0.0
    ratios = []
    for ref, per_concept in keeper.rows.items():
        if any(not rows for rows in per_concept) or any(ref not in c.deltas for c in plan.concepts):
            continue
        features = [torch.cat(rows) for rows in per_concept]
        m = min(int(f.shape[0]) for f in features)
        features = [f[:m] for f in features]
        base = host.base_weight(ref)
        lora = [c.deltas[ref] for c in plan.concepts]
        deltas = [d.dense().float() for d in lora]
        downs, ups = [d.down for d in lora], [d.up.float() for d in lora]
        mine = []
        for basis in (down_span(downs), None):
            stats = LayerStats(downs, basis=basis, device=device)
            for i, f in enumerate(features):
                stats.add(i, f.to(device))
            _sync(device)
            t0 = time.perf_counter()
            solution = solve_layer(stats, ups, base.to(device), OFFICIAL_DEFAULTS)
            mine.append(solution.dense().cpu())
            if basis is not None:
                ours += time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = official_recipe(
            base.to(device), [f.to(device) for f in features], [d.to(device) for d in deltas]
        ).cpu()
        recipe += time.perf_counter() - t0
        score = [
            objective_from_features(d, base, features, deltas, OFFICIAL_DEFAULTS)
            for d in (*mine, theirs)
        ]
        ratios.append((score[0] / max(score[2], 1e-30), score[1] / max(score[2], 1e-30)))
    if not ratios:
        return ours, recipe, 0, float("nan"), float("nan")
    span = sum(r[0] for r in ratios) / len(ratios)
    full = sum(r[1] for r in ratios) / len(ratios)
    return ours, recipe, len(ratios), span, full


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kept_layers(refs: list, count: int) -> list:
    """``count`` layers spread over the plan: text, cross-attention K/V and spatial ones."""
    from loraclr_ext.pipeline.plan import is_cross_kv

    kinds = [
        [r for r in refs if r.is_text],
        [r for r in refs if is_cross_kv(r)],
        [r for r in refs if r.component == "unet" and not is_cross_kv(r)],
    ]
    picked: list = []
    if count <= 0:
        return picked
    for group in kinds:
        share = max(1, count // 3)
        step = max(1, len(group) // share)
        picked += group[::step][:share]
    return picked


def run_case(case: Case, args, pipe, host, arch, folder: Path) -> Row:
    """One merge of ``case`` on the loaded model, measured."""
    from loraclr_ext.engine import flat_shape, run_merge
    from loraclr_ext.pipeline.memory import layer_bytes, plan_memory
    from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
    from loraclr_ext.pipeline.plan import plan_merge

    sub = Path(tempfile.mkdtemp(dir=folder))
    loras = write_random_loras(sub, case.concepts, args.rank, arch, locon=case.locon)
    specs = [ConceptSpec(p, f"tok{i} person") for i, p in enumerate(loras)]
    options = MergeOptions(
        steps=case.steps if case.steps is not None else args.steps,
        size=case.size if case.size is not None else args.size,
        quality=args.quality,
        memory_budget=args.memory_budget,
    )
    clock = CpuClock()
    watch = Stopwatch(host, clock)
    t0 = time.perf_counter()
    plan = plan_merge(specs, options, arch, sub / "merged.safetensors")
    load = time.perf_counter() - t0
    resolved = replace(plan, options=plan.options.resolved(host.device))
    shapes = {r: flat_shape(m) for r, m in host.modules(plan.refs).items()}
    stats_bytes = sum(layer_bytes(resolved, shapes, host.dtype.itemsize).values())
    passes = len(plan_memory(resolved, shapes, host.device, host.dtype).passes)
    keeper = FeatureKeeper(_kept_layers(plan.refs, args.recipe_layers), args.recipe_rows)
    exact = args.exact_memory and host.device.type == "cpu"
    live = LiveBytes(host.device) if exact else contextlib.nullcontext()

    def merge():
        with watch.attached(), keeper.attached(), live:
            return run_merge(plan, host, clock)

    measured = measure(merge, host.device)
    clock.close()
    result = measured.result
    device_peak = live.peak / 2**20 if isinstance(live, LiveBytes) else measured.peak_mib
    ours, recipe, compared, ratio, full = recipe_against_ours(keeper, plan, host)
    seconds = dict(result.seconds)
    seconds.update(load=load, text=watch.text, spatial=watch.spatial)
    return Row(
        case=case,
        steps=result.options.steps,
        size=result.options.size,
        seconds=seconds,
        total=measured.seconds + load,
        device_peak_mib=device_peak,
        host_peak_mib=measured.host_peak_mib,
        stats_mib=stats_bytes / 2**20,
        passes=passes,
        layers=len(result.layers),
        ours_s=ours,
        recipe_s=recipe,
        recipe_layers=compared,
        objective_ratio=ratio,
        objective_ratio_full=full,
        notes=result.notes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="SD1.5 or SDXL")
    parser.add_argument("--concepts", type=int, nargs="+", default=[2, 4, 12])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--locon", action="store_true", help="one more row: the first count with LoCon convs"
    )
    parser.add_argument(
        "--double",
        action="store_true",
        help="two more rows for the first count: steps doubled, size doubled (memory flatness)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="default: the merge's auto value for the device"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="default: the merge's auto value for the device"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["fp16", "bf16", "fp32"],
        help="default: fp16 on a GPU, fp32 on a CPU (bf16 halves an SDXL model's CPU memory)",
    )
    parser.add_argument(
        "--quality",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the quality report as a default merge does",
    )
    parser.add_argument("--memory-budget", type=float, default=0.0, help="GB; 0 = auto")
    parser.add_argument(
        "--exact-memory",
        action="store_true",
        help="on a CPU, count tensor memory exactly (bench.live_bytes; slows every op, so "
        "times are not comparable) instead of the resident-memory growth",
    )
    parser.add_argument(
        "--recipe-layers", type=int, default=6, help="layers the released recipe runs on"
    )
    parser.add_argument(
        "--recipe-rows", type=int, default=4096, help="rows kept per concept for the recipe"
    )
    args = parser.parse_args()

    from loraclr_ext.cli import _quiet_libraries
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.pipeline.options import auto_recording

    _quiet_libraries()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("fp16" if cuda else "fp32")]
    arch = Architecture.SDXL if args.arch == "sdxl" else Architecture.SD1
    cases = [Case(n) for n in args.concepts]
    if args.locon:
        cases.append(Case(args.concepts[0], locon=True))
    if args.double:
        steps, size = auto_recording(device)
        steps, size = args.steps or steps, args.size or size
        cases += [Case(args.concepts[0], steps=2 * steps), Case(args.concepts[0], size=2 * size)]

    t0 = time.perf_counter()
    pipe = (build_sdxl if arch is Architecture.SDXL else build_sd15)(device).to(dtype=dtype)
    host = StandaloneHost.from_pipeline(pipe, device, architecture=arch)
    setup = time.perf_counter() - t0
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    model_mib = (
        sum(
            p.numel() * p.element_size()
            for m in (pipe.unet, pipe.text_encoder)
            for p in m.parameters()
        )
        / 2**20
    )
    encoders = "CLIP-L + OpenCLIP-G" if arch is Architecture.SDXL else "CLIP-L"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"device: {device} ({where}), model dtype {dtype}, torch {torch.__version__}")
    print(
        f"model: {arch.label} UNet {unet_params / 1e6:.1f} M params + {encoders}, random "
        f"weights ({model_mib:.0f} MiB of UNet + first text encoder; built in {setup:.0f} s)"
    )
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            row = run_case(case, args, pipe, host, arch, Path(tmp))
            rows.append(row)
            print(f"  {case.label} LoRAs: {row.total:.1f} s", flush=True)
    print(
        f"LoRAs: rank {args.rank} on {rows[0].layers} text and UNet attention/feed-forward/proj "
        f"modules{' (+convs: see the row)' if args.locon else ''}; quality report "
        f"{'on' if args.quality else 'off'}; machine load {load_before:.1f} → "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print_table(
        [
            "LoRAs",
            "steps@px",
            "load s",
            "text s",
            "spatial s",
            "solve s",
            "report s",
            "write s",
            "total s",
        ],
        [
            [
                r.case.label,
                f"{r.steps}@{r.size}",
                *(
                    f"{r.seconds.get(k, 0):.1f}"
                    for k in ("load", "text", "spatial", "solve", "report", "write")
                ),
                f"{r.total:.1f}",
            ]
            for r in rows
        ],
    )
    print()
    kind = "allocated" if cuda else ("tensors, exact" if args.exact_memory else "RSS")
    print_table(
        [
            "LoRAs",
            "steps@px",
            f"peak device MiB beyond model ({kind})",
            "peak host RSS MiB",
            "statistics MiB",
            "passes",
            "layers",
            "solver vs released recipe (same rows)",
            "objective ours/recipe: LoRA span | all inputs",
        ],
        [
            [
                r.case.label,
                f"{r.steps}@{r.size}",
                f"{r.device_peak_mib:.0f}",
                f"{r.host_peak_mib:.0f}",
                f"{r.stats_mib:.0f}",
                f"{r.passes}",
                f"{r.layers}",
                _speedup(r),
                f"{r.objective_ratio:.3f} | {r.objective_ratio_full:.3f}",
            ]
            for r in rows
        ],
    )
    for r in rows:
        for note in r.notes:
            print(f"note ({r.case.label}): {note}")
    print(
        f"\nrecipe: AdamW lr 1e-4 × 50 steps on ≤ {args.recipe_rows} kept rows per concept of "
        f"{args.recipe_layers} layers (text, cross-attention K/V, spatial), timed on the same "
        "device as our solve of those layers; the released code keeps every row, so its "
        "real time and memory are higher"
    )


def _speedup(row: Row) -> str:
    if not row.recipe_layers or row.ours_s <= 0:
        return "—"
    return (
        f"{row.recipe_s / row.ours_s:.1f}× ({row.ours_s * 1e3:.0f} ms vs "
        f"{row.recipe_s * 1e3:.0f} ms, {row.recipe_layers} layers)"
    )


class CpuClock:
    """Progress that also books this process's CPU seconds to each stage (the solve's
    stage runs to the report's start, the report's to the end of the merge)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.current: str | None = None
        self.mark = time.process_time()

    def _book(self) -> None:
        now = time.process_time()
        if self.current is not None:
            self.cpu[self.current] = self.cpu.get(self.current, 0.0) + now - self.mark
        self.mark = now

    def stage(self, text: str, total: int) -> None:
        self._book()
        self.current = text

    def advance(self, steps: int = 1) -> None:
        pass

    def interrupted(self) -> bool:
        return False

    def close(self) -> None:
        self._book()
        self.current = None


if __name__ == "__main__":
    main()
