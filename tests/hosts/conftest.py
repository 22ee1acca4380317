"""Host adapter tests: the A1111, Forge and reForge adapters over stand-ins of the WebUIs'
model objects (``tests/fakes``). No gradio is needed, so they run in the default tier."""

from __future__ import annotations

import sys
from pathlib import Path

FAKES = Path(__file__).resolve().parents[1] / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))
