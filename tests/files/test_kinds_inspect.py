"""``inspect`` on every file kind: the layouts that merge (written at the real SD1/SDXL
module sizes, so the architecture is told from the tensors as in a user's file) and the
kinds refused by name. Format, architecture, ranks, modules per component, triggers, what
is not merged and why."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from loraclr_ext.cli import main

FAKES = Path(__file__).resolve().parents[1] / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))
from lora_fixtures import (  # noqa: E402
    LAYOUTS,
    REFUSED,
    Layout,
    Refused,
    real_targets,
    write_layout,
    write_refused,
)


def inspect(capsys, path: Path) -> tuple[int, dict]:
    code = main(["inspect", str(path), "--json"])
    out, _ = capsys.readouterr()
    return code, json.loads(out)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_inspect_says_what_each_layout_is(layout: Layout, tmp_path: Path, capsys) -> None:
    targets = real_targets(layout.arch, layout.leaves)
    path = tmp_path / f"{layout.name}.safetensors"
    write_layout(layout, targets, path, seed=2)
    code, info = inspect(capsys, path)
    assert code == 0
    assert info["usable"] is True and info["reason"] is None
    assert info["architecture"] == layout.arch.label
    assert info["format"] == layout.format
    assert info["ranks"] == ([] if layout.rank is None else [layout.rank])
    assert info["modules"] == dict(Counter(t.ref.component for t in targets))
    assert info["triggers"] == list(layout.triggers)
    if layout.name == "full":  # diff_b beside every diff: listed, not merged, not refused
        assert info["not merged"] == f"{len(targets)} side parts (bias / norm deltas) not merged"
    else:
        assert info["not merged"] is None
    assert info["unmatched"] == 0  # modules not merged; side parts of read modules aside


@pytest.mark.parametrize("kind", REFUSED, ids=[kind.name for kind in REFUSED])
def test_inspect_names_what_is_refused_and_why(kind: Refused, tmp_path: Path, capsys) -> None:
    path = write_refused(kind, tmp_path / f"{kind.name}.safetensors")
    code, info = inspect(capsys, path)
    assert code == 1
    assert info["usable"] is False
    assert info["architecture"] == kind.family
    assert kind.reason in info["reason"]
    assert info["reason"].startswith(path.name)
    assert info["not merged"] == kind.not_merged
    assert info["triggers"] == list(kind.triggers)
