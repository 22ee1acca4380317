"""The package's layers import only downward (CONTRIBUTING.md, "Layers").

Every ``import`` of ``loraclr_ext`` in every module, function-level ones included, is
checked against the layer table; a module may import its own package and anything in a
lower layer, never a higher layer or a sibling package of its own layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loraclr_ext"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", ""),  # "" is the package root (``__version__``)
    ("model",),
    ("files", "solver"),
    ("hosts",),
    ("pipeline",),
    ("report", "preview"),
    ("engine",),
    ("demo", "ui"),
    ("cli",),
    ("__main__",),
)
"""Bottom first. ``hosts`` sits below ``pipeline``: the pipeline drives a host through the
``hosts.base`` protocol, and no adapter needs anything of the pipeline."""

LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}
GRADIO_FREE = (
    "model",
    "files",
    "solver",
    "hosts",
    "pipeline",
    "report",
    "preview",
    "engine",
    "demo",
)
"""Units that never import gradio, fastapi or the WebUI's ``modules`` (only ``ui`` may)."""


def _unit(module: str) -> str:
    """``loraclr_ext.files.read`` → ``files``; ``loraclr_ext`` → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "loraclr_ext":  # ``from loraclr_ext import files``
                found += [
                    (node.lineno, f"loraclr_ext.{a.name}") for a in node.names if a.name in LEVEL
                ]
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _unit(_module_name(path))
        assert here in LEVEL, f"{path}: package unit '{here}' has no layer; add it to LAYERS"
        for line, target in _imports(path):
            top = target.split(".")[0]
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if top in ("gradio", "fastapi", "modules", "starlette") and here in GRADIO_FREE:
                bad.append(f"{where} (only ui may import the web stack or the WebUI)")
            if top != "loraclr_ext" or target == "loraclr_ext":
                continue
            there = _unit(target)
            if there == here:
                continue
            if LEVEL[there] >= LEVEL[here]:
                bad.append(f"{where} (layer {LEVEL[here]} -> {LEVEL[there]})")
    return bad


def test_imports_only_go_down() -> None:
    assert _violations() == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch) -> None:
    """The check itself can fail: a model module importing the pipeline is reported."""
    fake = tmp_path / "loraclr_ext"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("def f():\n    from loraclr_ext.pipeline import plan\n")
    (fake / "solver").mkdir()
    (fake / "solver" / "sideways.py").write_text("from loraclr_ext.files import read\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    found = _violations()
    assert any("model/bad.py:2 imports loraclr_ext.pipeline" in v for v in found)
    assert any("solver/sideways.py:1 imports loraclr_ext.files" in v for v in found)
