"""End-to-end benchmark at real SD1.5 or SDXL shapes: ``python -m bench.pipeline [options]``.

Builds a random-weight SD1.5 UNet (859.5 M parameters) and CLIP-L text encoder, or
(``--arch sdxl``) the SDXL UNet (2.6 G) with CLIP-L and OpenCLIP-G, from the configs the
package ships (no download), writes N random rank-r concept LoRAs on every text-encoder
and UNet-attention module (SD1.5: 72 + 192, as kohya trains them), and runs the
whole merge: read files, record features through hooks, solve every layer, write the
kohya file. Prints the device, shapes, stage times, peak memory beyond the loaded model,
and the feature memory the released code's approach (keeping every feature) would need
against the statistics this pipeline keeps. Weights are random, so quality numbers mean
nothing here; ``python -m loraclr_ext demo`` measures quality.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

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
    folder: Path, count: int, rank: int, arch: Architecture = Architecture.SD1
) -> list[Path]:
    """``count`` kohya LoRAs of rank ``rank`` on ``arch``'s text and transformer modules."""
    from loraclr_ext.files.metadata import LoraMetadata
    from loraclr_ext.files.write import write_lora

    specs = [s for s in module_specs(arch) if s.group in ("text", "transformer")]
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        factors = {}
        for spec in specs:
            up = torch.randn(spec.out_features, rank, generator=g) * 0.02
            down = torch.randn(rank, spec.flat_in, generator=g) / spec.flat_in**0.5
            factors[spec.ref] = ModuleDelta(up, down, spec.kernel)
        path = folder / f"concept{i}.safetensors"
        write_lora(path, factors, arch, LoraMetadata(triggers=[f"tok{i}"]))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="SD1.5 or SDXL")
    parser.add_argument("--concepts", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
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
        help="run the quality report as a default merge does (its share is printed)",
    )
    args = parser.parse_args()

    from loraclr_ext.cli import _quiet_libraries
    from loraclr_ext.engine import run_merge
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
    from loraclr_ext.pipeline.plan import plan_merge
    from loraclr_ext.report.quality import report_size, report_work

    _quiet_libraries()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("fp16" if cuda else "fp32")]
    arch = Architecture.SDXL if args.arch == "sdxl" else Architecture.SD1

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        loras = write_random_loras(folder, args.concepts, args.rank, arch)
        pipe = (build_sdxl if arch is Architecture.SDXL else build_sd15)(device).to(dtype=dtype)
        host = StandaloneHost.from_pipeline(pipe, device, architecture=arch)
        setup = time.perf_counter() - t0
        specs = [ConceptSpec(p, f"tok{i} person") for i, p in enumerate(loras)]
        options = MergeOptions(steps=args.steps, size=args.size, quality=args.quality)
        load_before = os.getloadavg()[0]
        cpu_before = time.process_time()

        plans = []
        progress = CpuClock()

        def merge():
            plan = plan_merge(specs, options, arch, folder / "merged.safetensors")
            plans.append(plan)
            return run_merge(plan, host, progress)

        measured = measure(merge, device)
        result = measured.result
        cpu_seconds = time.process_time() - cpu_before
        progress.close()
        steps, size = result.options.steps, result.options.size

    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    encoders = "CLIP-L + OpenCLIP-G" if arch is Architecture.SDXL else "CLIP-L"
    modules = len(result.layers)
    print(
        f"device: {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} CPU threads'}), {dtype}"
    )
    print(
        f"model: {arch.label} UNet {unet_params / 1e6:.1f} M params + {encoders}, random weights (built in {setup:.0f} s)"
    )
    print(
        f"concepts: {args.concepts} LoRAs × rank {args.rank} on {modules} text and UNet attention modules"
    )
    print(
        f"recording run: {steps} steps at {size}px, batch 2, per concept ({result.recording_summary()})"
    )
    if result.report is not None:
        print(
            f"quality report: UNet at {report_size(size)}px, {report_work(plans[0])} image evaluations"
        )
    print(
        f"machine load: 1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        f"this process used {cpu_seconds:.0f} CPU s in {measured.seconds:.0f} s\n"
    )
    rows = [
        [
            f"{args.concepts}",
            f"{result.seconds.get('collect', 0):.1f}",
            f"{result.seconds.get('solve', 0):.1f}",
            f"{result.seconds.get('report', 0):.1f}",
            f"{result.seconds.get('write', 0):.1f}",
            f"{measured.seconds:.1f}",
            f"{measured.peak_mib:.0f}",
            f"{max(layer.rank for layer in result.layers)}",
        ]
    ]
    print_table(
        [
            "concepts",
            "collect s",
            "solve s",
            "report s",
            "write s",
            "total s",
            "peak MiB beyond model",
            "max rank",
        ],
        rows,
    )
    if result.report is not None:
        share = result.seconds.get("report", 0) / max(sum(result.seconds.values()), 1e-9)
        print(f"\nquality report: {share:.0%} of the merge's time (bar: ≤ 25 %)")
    stages = progress.cpu
    total_cpu = sum(stages.values())
    print(
        "CPU seconds per stage (immune to the machine's other load): "
        + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
        + (
            f"; report share {stages.get('Measuring quality', 0) / total_cpu:.0%}"
            if total_cpu
            else ""
        )
    )
    active = [layer for layer in result.layers if layer.repel_active]
    iterations = sum(layer.iterations for layer in active)
    print(
        f"\nlayers: {len(result.layers)}; margin violated at the closed form in {len(active)}; L-BFGS iterations in all: {iterations}"
    )
    print(
        f"\nfeature memory if every feature were kept (released code's approach): {_kept_features_mib(result, args.concepts, steps, size):.0f} MiB"
    )


class CpuClock:
    """Progress that also books this process's CPU seconds to each stage (the solve's
    stage runs to the report's start, the report's to the end of the merge)."""

    def __init__(self) -> None:
        from loraclr_ext.cli import TqdmProgress

        self.bar = TqdmProgress()
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
        self.bar.stage(text, total)

    def advance(self, steps: int = 1) -> None:
        self.bar.advance(steps)

    def interrupted(self) -> bool:
        return False

    def close(self) -> None:
        self._book()
        self.current = None
        self.bar.close()


def _kept_features_mib(result, concepts: int, steps: int, size: int) -> float:
    """What holding every recorded input row would cost (fp16), from the row counts."""
    from loraclr_ext.model.naming import module_spec

    total = 0
    for layer in result.layers:
        component, path = layer.ref.split(":", 1)
        from loraclr_ext.model.targets import ModuleRef

        spec = module_spec(ModuleRef(component, path), Architecture.SD1)
        if spec is None:
            continue
        if component != "unet" or path.endswith(("attn2.to_k", "attn2.to_v")):
            rows = 5 * 77
        else:
            rows = 2 * steps * _tokens(path, size)
        total += rows * spec.flat_in * 2 * concepts
    return total / 2**20


def _tokens(path: str, size: int) -> int:
    """Spatial tokens of a UNet transformer block at ``size`` px (latent size/8)."""
    side = size // 8
    level = {
        "down_blocks.0": 0,
        "down_blocks.1": 1,
        "down_blocks.2": 2,
        "mid_block": 3,
        "up_blocks.1": 2,
        "up_blocks.2": 1,
        "up_blocks.3": 0,
    }
    for prefix, down in level.items():
        if path.startswith(prefix):
            return (side >> down) ** 2
    return side**2


if __name__ == "__main__":
    main()
