"""WebUI tests: real gradio and FastAPI over stand-ins of ``modules.*``.

``.ci/run-ui`` runs them twice: in ``.ci/ui-venv`` (gradio 3.41.2, A1111 1.10 / reForge)
and in ``.ci/ui-venv-g4`` (gradio 4.40.0, Forge). Not collected where gradio is not installed
(the test modules import the stand-ins and gradio at module level).
"""

from __future__ import annotations

import importlib.util
import os
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
