"""A real third-party loader reads our output: diffusers ``load_lora_weights`` (via peft)
puts every module of the merged file into tiny SD1 and SDXL pipelines, and the loaded
pipeline computes what our own hooks compute with the same factors."""

from __future__ import annotations

import re

import pytest
import torch

from loraclr_ext.demo.run import CONCEPTS, build_demo_loras
from loraclr_ext.demo.tiny import build_tiny_pipeline
from loraclr_ext.engine import run_merge
from loraclr_ext.hosts.standalone import StandaloneHost
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
from loraclr_ext.pipeline.plan import plan_merge
from loraclr_ext.report.quality import _run

pytestmark = pytest.mark.slow  # whole merges on the tiny model

pytest.importorskip("peft", reason="diffusers needs peft to load LoRAs")


def lora_modules(model):
    return {n for n, _ in model.named_modules() if re.search(r"\.lora_A\.[^.]+$", n)}


@pytest.mark.parametrize("arch", [Architecture.SD1, Architecture.SDXL])
def test_diffusers_loads_every_module_and_matches_our_hooks(arch, tmp_path):
    host = StandaloneHost.from_pipeline(build_tiny_pipeline(arch, text_width=64), "cpu")
    loras = build_demo_loras(host, tmp_path)
    specs = [ConceptSpec(p, c) for p, (c, _) in zip(loras, CONCEPTS)]
    options = MergeOptions(size=64, steps=2, quality=False, precision="fp32")
    plan = plan_merge(specs, options, arch, tmp_path / "merged.safetensors", check_shapes=False)
    result = run_merge(plan, host)

    prompts = ["a painting of sks dog", "zwx cat on a street"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = _run(host, host.modules(plan.refs), result.factors, prompts, latents)
    base = _run(host, {}, {}, prompts, latents)

    pipe = build_tiny_pipeline(arch, text_width=64)
    pipe.load_lora_weights(str(result.path))
    loaded_host = StandaloneHost.from_pipeline(pipe, "cpu")
    loaded = _run(loaded_host, {}, {}, prompts, latents)

    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch is Architecture.SDXL else [])
    installed = len(lora_modules(pipe.unet)) + sum(len(lora_modules(e)) for e in encoders)
    assert installed == len(result.factors)  # no key left over, none dropped
    assert float((loaded.eps - base.eps).norm() / base.eps.norm()) > 1e-3  # it changes outputs
    eps_error = (loaded.eps - ours.eps).norm() / (ours.eps - base.eps).norm()
    text_error = (loaded.cond.context - ours.cond.context).norm() / (
        ours.cond.context - base.cond.context
    ).norm()
    assert float(eps_error) < 1e-3
    assert float(text_error) < 1e-3
