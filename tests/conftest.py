"""Shared fixtures: tiny real diffusers models and selective concept LoRAs, built offline."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAKES = Path(__file__).resolve().parent / "fakes"


def use_fakes() -> None:
    """Put the WebUI stand-ins (``modules``, ``backend``, ``ldm_patched``, ``forge_fakes``) and
    the shared LoRA fixtures on ``sys.path``; only the host and WebUI test folders call it."""
    if str(FAKES) not in sys.path:
        sys.path.insert(0, str(FAKES))


@pytest.fixture(scope="session")
def sd1_demo(tmp_path_factory):
    """A saved tiny SD1 model folder, its host, and three concept LoRAs fitted on it."""
    from loraclr_ext.demo.run import TEXT_WIDTH, build_demo_loras
    from loraclr_ext.demo.tiny import save_tiny_model
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.model.architecture import Architecture

    root = tmp_path_factory.mktemp("sd1_demo")
    model = save_tiny_model(Architecture.SD1, root / "model", text_width=TEXT_WIDTH)
    host = StandaloneHost.load(model, "cpu")
    loras = build_demo_loras(host, root)
    return {"root": root, "model": model, "host": host, "loras": loras}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny SD1 pipeline, its standalone host, and fixture LoRAs in a source folder."""
    use_fakes()
    from lora_fixtures import random_lora, sdxl_lora

    from loraclr_ext.demo.tiny import build_tiny_pipeline
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.model.architecture import Architecture

    pipe = build_tiny_pipeline(Architecture.SD1)
    host = StandaloneHost.from_pipeline(pipe, "cpu")
    src = tmp_path_factory.mktemp("loras")
    (src / "people").mkdir()
    random_lora(host, src / "sks_dog.safetensors", "sks dog", 0)
    random_lora(host, src / "people" / "zwx_cat.safetensors", "zwx cat", 1)
    random_lora(host, src / "qpr_castle.safetensors", "qpr castle", 2)
    sdxl_lora(src / "xl_style.safetensors")
    (src / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return {"pipe": pipe, "host": host, "src": src}


@pytest.fixture
def webui(tiny, tmp_path):
    """Fresh WebUI stand-in state: Lora folder with the fixtures, a loaded fake SD1 model."""
    use_fakes()
    import networks
    from modules import sd_models, shared
    from modules.options import Options
    from modules.shared_state import State
    from sd_model import FakeSdModel

    from loraclr_ext.ui.service import WebuiContext

    lora_dir = tmp_path / "Lora"
    shutil.copytree(tiny["src"], lora_dir)
    shared.cmd_opts.lora_dir = str(lora_dir)
    shared.cmd_opts.api_auth = None
    shared.opts = Options()
    shared.state = State()
    networks.loaded_networks.clear()
    networks.refresh_calls = 0
    model = FakeSdModel(tiny["pipe"])
    sd_models.reset()
    sd_models.model_data.sd_model = model
    ctx = WebuiContext.from_webui()
    ctx.check_shapes = False  # tiny model: real SD1 sizes do not apply
    yield {"ctx": ctx, "dir": lora_dir, "model": model, "shared": shared, "networks": networks}
    sd_models.reset()
