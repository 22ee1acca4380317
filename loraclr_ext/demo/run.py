"""The self-contained demo: a tiny SD1 model, three concept LoRAs, one merge, one report.

Everything is built here and seeded — no download — so ``python -m loraclr_ext demo``
shows the whole product path (files in, concepts run through a real diffusers model,
one kohya LoRA out, quality report) in well under a minute on a laptop CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loraclr_ext.hosts.base import Host
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.pipeline.progress import Progress
from loraclr_ext.report.quality import QualityReport

CONCEPTS = (("sks dog", "sks"), ("zwx cat", "zwx"), ("qpr castle", "qpr"))
TEXT_WIDTH = 256
"""Text width of the demo model: wide enough for trigger-selective LoRAs (SD1.5: 768)."""


def build_demo_loras(host: Host, folder: Path) -> list[Path]:
    """Fit one selective LoRA per demo concept on ``host`` and write it as a kohya file."""
    from loraclr_ext.demo.concept_fit import FitSettings, fit_concept
    from loraclr_ext.files.metadata import LoraMetadata
    from loraclr_ext.files.write import write_lora

    paths = []
    for i, (prompt, trigger) in enumerate(CONCEPTS):
        others = [p for p, _ in CONCEPTS if p != prompt]
        deltas = fit_concept(host, prompt, trigger, others, FitSettings(seed=i))
        path = folder / f"{prompt.replace(' ', '_')}.safetensors"
        write_lora(
            path,
            deltas,
            host.architecture,
            LoraMetadata(title=prompt, triggers=[trigger]),
            overwrite=True,
            check_shapes=False,
        )
        paths.append(path)
    return paths


def run_demo(workdir: Path, progress: Progress | None = None) -> dict:
    """Build a tiny model and three concept LoRAs in ``workdir``, merge them, print and save
    the report (``merged.report.json``); every file stays in ``workdir``."""
    from loraclr_ext.demo.tiny import save_tiny_model
    from loraclr_ext.engine import merge
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions

    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = save_tiny_model(Architecture.SD1, root / "tiny-sd1", text_width=TEXT_WIDTH)
    host = StandaloneHost.load(model, "cpu")
    loras = build_demo_loras(host, root)
    print(f"built a tiny SD1 model and {len(loras)} concept LoRAs in {root}")
    specs = [ConceptSpec(path, prompt) for path, (prompt, _) in zip(loras, CONCEPTS, strict=True)]
    options = MergeOptions(output="merged", size=64, steps=8, overwrite=True)
    output = root / "merged.safetensors"
    result = merge(specs, options, output, lambda: host, progress, check_shapes=False)
    close = getattr(progress, "close", None)
    if callable(close):
        close()
    total = time.perf_counter() - started
    modules = len(result.layers)
    print(f"wrote {output.name} ({modules} modules), use it as: {result.prompt_tag}")
    print(f"demo took {total:.1f} s (merge stages: {result.seconds})\n")
    assert result.report is not None  # quality is on in the demo's options
    print(result.report.table())
    summary = {
        "seconds": round(total, 2),
        "stages": result.seconds,
        "report": result.report.to_dict(),
    }
    (root / "merged.report.json").write_text(json.dumps(summary, indent=2))
    _explain(result.report)
    print(
        f"\nFiles kept in {root}: the model (tiny-sd1/), the concept LoRAs, merged.safetensors, "
        "merged.json and merged.report.json."
    )
    return summary


def _explain(report: QualityReport) -> None:
    ours, stacked = report.method("loraclr"), report.method("stacked")
    measures = (
        ("text@trigger", "text_trigger"),
        ("UNet", "unet"),
        ("leak", "leak"),
        ("joint K/V", "joint_kv"),
        ("joint bleed", "joint_bleed"),
    )
    pairs = ", ".join(
        f"{label} {ours.mean(key):.3f} vs {stacked.mean(key):.3f}" for label, key in measures
    )
    print(
        "\nErrors are |merged − LoRA alone| / |LoRA alone − base| on held-out prompts "
        "(0 = perfect);\nleak = share of the other LoRAs' effect on a concept's own prompts "
        "(stacking ≈ 1, averaging ≈ 1/n, 0 = none);\njoint = prompts naming two concepts "
        '("A and B in a park"), at each concept\'s words in the cross-attention keys/values:\n'
        "its error against its LoRA alone there, and the share of the partner's effect landing "
        f"there (bleed).\nLoRACLR vs stacking: {pairs}."
    )
