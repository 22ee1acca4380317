"""gradio-version helpers for the WebUI tests (the LoRA fixtures are in ``lora_fixtures``)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

WEBUI_GRADIO = {"3.41.2": "A1111 1.10 / reForge", "4.40.0": "Forge"}
"""The gradio each WebUI pins; tests/webui runs under both (``.ci/run-ui``)."""


def gradio_version() -> str:
    """The installed gradio's version, read without importing it."""
    return version("gradio")


def gradio_major() -> int:
    return int(gradio_version().split(".", 1)[0])


def component_ids(blocks: Any) -> set[str]:
    """Every ``elem_id`` in a Blocks' frontend config (under each component's ``props`` in
    both gradio 3.41 and 4.40)."""
    ids = (c.get("props", {}).get("elem_id") for c in blocks.config["components"])
    return {i for i in ids if i}


def js_hooks(blocks: Any) -> set[str]:
    """Names of the JS functions the Blocks' events run (``js`` in both versions' config,
    whichever keyword set them)."""
    return {d["js"] for d in blocks.config["dependencies"] if d.get("js")}
