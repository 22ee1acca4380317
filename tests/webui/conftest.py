"""WebUI tests: real gradio and FastAPI over stand-ins of ``modules.*``.

``.ci/run-ui`` runs them twice: in ``.ci/ui-venv`` (gradio 3.41.2, A1111 1.10 / reForge)
and in ``.ci/ui-venv-g4`` (gradio 4.40.0, Forge). Not collected where gradio is not installed
(the test modules import the stand-ins and gradio at module level).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
HAVE_GRADIO = importlib.util.find_spec("gradio") is not None
FAKES = Path(__file__).resolve().parents[1] / "fakes"
HERE = Path(__file__).resolve().parent
if HAVE_GRADIO:
    for folder in (FAKES, HERE):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
else:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if not HAVE_GRADIO:
        return "tests/webui: gradio is not installed here, not collected (.ci/run-ui runs them)"
    from fixtures import WEBUI_GRADIO, gradio_version

    found = gradio_version()
    return f"tests/webui: gradio {found} ({WEBUI_GRADIO.get(found, 'not a WebUI pin')})"


def pytest_configure(config):
    config.addinivalue_line("markers", "webui: WebUI tab/API tests (need gradio 3.41 or 4.40)")
    config.addinivalue_line("markers", "browser: drives Debian chromium (needs playwright)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.webui)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny SD1 pipeline, its standalone host, and fixture LoRAs in a source folder."""
    from fixtures import random_lora, sdxl_lora

    from loraclr_ext.architecture import Architecture
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.hosts.tiny import build_tiny_pipeline

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
    import networks
    from modules import sd_models, shared
    from modules.options import Options
    from modules.shared_state import State
    from sd_model import FakeSdModel

    from loraclr_ext.webui.service import WebuiContext

    lora_dir = tmp_path / "Lora"
    shutil.copytree(tiny["src"], lora_dir)
    shared.cmd_opts.lora_dir = str(lora_dir)
    shared.cmd_opts.api_auth = None
    shared.opts = Options()
    shared.state = State()
    networks.loaded_networks.clear()
    networks.refresh_calls = 0
    model = FakeSdModel(tiny["pipe"])
    sd_models.model_data.sd_model = model
    ctx = WebuiContext.from_webui()
    ctx.check_shapes = False  # tiny model: real SD1 sizes do not apply
    yield {"ctx": ctx, "dir": lora_dir, "model": model, "shared": shared, "networks": networks}
    sd_models.model_data.sd_model = None
