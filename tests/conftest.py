"""Shared fixtures: tiny real diffusers models and selective concept LoRAs, built offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def sd1_demo(tmp_path_factory):
    """A saved tiny SD1 model folder, its host, and three concept LoRAs fitted on it."""
    from loraclr_ext.architecture import Architecture
    from loraclr_ext.demo import TEXT_WIDTH, build_demo_loras
    from loraclr_ext.hosts.standalone import StandaloneHost
    from loraclr_ext.hosts.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("sd1_demo")
    model = save_tiny_model(Architecture.SD1, root / "model", text_width=TEXT_WIDTH)
    host = StandaloneHost.load(model, "cpu")
    loras = build_demo_loras(host, root)
    return {"root": root, "model": model, "host": host, "loras": loras}
