"""Engine progress on ``shared.state``: the WebUI progress bar and its Interrupt button."""

from __future__ import annotations

from typing import Any


class StateProgress:
    """Reports stages as ``state.textinfo`` and steps as ``sampling_step/sampling_steps``;
    ``interrupted()`` follows ``state.interrupted`` (the tab's Interrupt button)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.state.job_count = 1
        self.state.job_no = 0

    def stage(self, text: str, total: int) -> None:
        self.state.textinfo = f"LoRACLR: {text}"
        self.state.sampling_steps = max(int(total), 1)
        self.state.sampling_step = 0

    def advance(self, steps: int = 1) -> None:
        self.state.sampling_step = min(self.state.sampling_step + steps, self.state.sampling_steps)

    def interrupted(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))
