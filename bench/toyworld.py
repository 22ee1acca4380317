"""The toy world's identity table: ``python -m bench.toyworld [--cache DIR] [--case NAME]``.

Builds (once; cached under ``--cache``, default ``./loraclr-toyworld``) a tiny SD1-layout
text-to-image model trained on a synthetic world and four DreamBooth kohya LoRAs of new
concepts on it (``loraclr_ext/demo/toyworld``), then for each case merges the case's LoRAs
with ``engine.merge`` and scores base, each LoRA alone, stacking, averaging, least squares
and the merge on generated latents: identity of each concept alone (1x) and at its place in
two-concept prompts (2x), and bleed of the other concept into its place (bl). 0 = the base
model, 1 = the concept's own LoRA alone.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path("loraclr-toyworld"))
    parser.add_argument("--case", choices=["two persons", "four concepts", "all"], default="all")
    parser.add_argument("--seeds", type=int, default=8, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sample")
    args = parser.parse_args()

    from loraclr_ext.cli import _quiet_libraries
    from loraclr_ext.demo.toyworld.build import build_toy_world
    from loraclr_ext.demo.toyworld.identity import (
        fit_prototypes,
        generate,
        recognition,
        recognition_scenes,
    )
    from loraclr_ext.demo.toyworld.table import CASES, EvalSettings, case_table
    from loraclr_ext.demo.toyworld.world import build_world, scene_prompt
    from loraclr_ext.hosts.standalone import StandaloneHost

    _quiet_libraries()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    files = build_toy_world(args.cache, log=True)
    print(
        f"toy world in {files.model.parent} (built in {files.seconds} s; {time.perf_counter() - t0:.0f} s now)"
    )
    torch.set_num_threads(1)
    host = StandaloneHost.load(files.model, "cpu")
    unet_params = sum(p.numel() for p in host.pipe.unet.parameters())
    text_width = host.pipe.text_encoder.config.hidden_size
    print(
        f"device: cpu (1 thread); model: SD1-layout UNet {unet_params / 1e6:.2f} M params, "
        f"CLIP text encoder width {text_width}; latents [4, 8, 8] (64 px), two slots [4, 8, 4]"
    )
    scenes = recognition_scenes(30)
    latents = generate(
        host,
        [scene_prompt(s) for s in scenes],
        {},
        seeds=4,
        steps=args.steps,
        alphas_cumprod=host.pipe.scheduler.alphas_cumprod.float(),
    )
    rec = recognition(fit_prototypes(build_world()), latents, scenes)
    print(
        f"base model recognition on {rec.slots} generated slots ({len(scenes)} prompts × 4 seeds, "
        f"DDIM {args.steps}): class {rec.noun:.3f}, colour {rec.colour:.3f}, both {rec.both:.3f}\n"
    )
    settings = EvalSettings(seeds=args.seeds, steps=args.steps)
    for case in CASES:
        if args.case not in ("all", case.name):
            continue
        table = case_table(case, files, settings)
        prompts = case.prompts()
        print(
            f"case '{case.name}': {', '.join(c.prompt for c in case.concepts)}; "
            f"{len(prompts)} prompts × {args.seeds} seeds, DDIM {args.steps} steps; "
            f"merge recorded {settings.merge.steps} steps at {settings.merge.size}px "
            f"({table.seconds:.0f} s)"
        )
        print(table.text())
        print()
    print(
        f"machine load: 1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
