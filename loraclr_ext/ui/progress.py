"""Engine progress on ``shared.state``: the WebUI progress bar, its ETA and Interrupt.

The WebUI's progress API turns ``state`` into one number,
``job_no/job_count + sampling_step/(sampling_steps·job_count)``, and its ETA into
``elapsed/progress − elapsed`` (research a1111.md §2.6). The engine reports stages that each
count from 0 ("Recording…", "Solving…", "Measuring quality"); mapped one to one, the bar fell
back to ~1 % at every stage and the ETA jumped to days. Here the whole merge is one job:
every stage owns a slice of one monotone 0–1 scale, weighted by its usual share of the time,
and ``sampling_step`` counts thousandths of the whole merge.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from loraclr_ext.pipeline.progress import PASSES_STAGE

RESOLUTION = 1000
"""``sampling_steps`` of the one job: progress is shown in thousandths."""

STAGES: tuple[tuple[str, str, float], ...] = (
    # (key, what the engine's stage text starts with, usual share of a merge's time)
    ("prepare", "", 0.04),  # opening the model, reading the LoRAs
    ("collect", "Recording", 0.50),
    ("solve", "Solving", 0.12),
    ("report", "Measuring", 0.22),
    ("write", "", 0.12),  # no engine stage: follows the last one
    ("preview", "Preview", 0.40),  # only when asked for: images drawn by the WebUI's txt2img
)
"""Stage weights from CPU and GPU runs of two SD 1.5 LoRAs (collect ≈ half, the report ≤ a
quarter; a preview took 1.6× the rest of a merge in a real A1111 on a CPU). Only their
order matters for a monotone bar; their sizes make the ETA sane."""


@dataclass
class Span:
    key: str
    start: float
    end: float


def spans(quality: bool = True, preview: bool = False) -> list[Span]:
    """The stages' slices of [0, 1], without the report or the preview when they are off."""
    off = {key for key, on in (("report", quality), ("preview", preview)) if not on}
    used = [s for s in STAGES if s[0] not in off]
    total = sum(w for _, _, w in used)
    out, start = [], 0.0
    for key, _, weight in used:
        end = start + weight / total
        out.append(Span(key, start, end))
        start = end
    out[-1].end = 1.0
    return out


@dataclass
class Snapshot:
    """Where one merge is: what ``GET /loraclr/v1/status`` reports."""

    output: str
    source: str
    started: float = field(default_factory=time.time)
    stage: str = "preparing"
    fraction: float = 0.0
    finished: float | None = None
    outcome: str | None = None

    @property
    def running(self) -> bool:
        return self.finished is None

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, the way the WebUI's progress API estimates them."""
        if not self.running or self.fraction <= 0:
            return None
        elapsed = (now or time.time()) - self.started
        return max(elapsed / self.fraction - elapsed, 0.0)

    def to_dict(self) -> dict[str, Any]:
        eta = self.eta()
        return {
            "running": self.running,
            "output": self.output,
            "source": self.source,
            "stage": self.stage,
            "progress": round(self.fraction, 3),
            "started": _iso(self.started),
            "elapsed_s": round((self.finished or time.time()) - self.started, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "finished": None if self.finished is None else _iso(self.finished),
            "outcome": self.outcome,
        }


def _iso(stamp: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")


class StateProgress:
    """One monotone progress over the whole merge on ``state``; ``interrupted()`` follows
    ``state.interrupted`` (the tab's Interrupt button, ``POST /loraclr/v1/interrupt``).

    Args:
        state: ``shared.state`` (inside a job begun by the caller).
        quality: whether the merge measures quality (the report's slice is left out if not).
        snapshot: updated alongside ``state`` for the status route.
        preview: whether a preview follows (its slice, last, is :class:`PreviewProgress`'s).
    """

    def __init__(
        self,
        state: Any,
        *,
        quality: bool = True,
        snapshot: Snapshot | None = None,
        preview: bool = False,
    ):
        self.state = state
        self.snapshot = snapshot
        self.spans = spans(quality, preview)
        self.span = self.spans[0]
        self.total = 1
        self.done = 0
        self.text = "preparing"
        self.state.job_count = 1
        self.state.job_no = 0
        self.state.sampling_steps = RESOLUTION
        self.state.sampling_step = 0
        self._show("preparing (checkpoint, LoRAs)")

    @property
    def fraction(self) -> float:
        return self.state.sampling_step / RESOLUTION

    def stage(self, text: str, total: int) -> None:
        self.span = self._span_for(text)
        self.total = max(int(total), 1)
        self.done = 0
        self.text = text
        self._move(self.span.start)

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.done + steps, self.total)
        span = self.span
        self._move(span.start + (span.end - span.start) * self.done / self.total)
        if self.done >= self.total and self._next_is_write():
            self.text = "writing the file"
            self.span = self._write_span()
            self.done, self.total = 0, 1
            self._show(self.text)

    def interrupted(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))

    # -- inside

    def _span_for(self, text: str) -> Span:
        if text.startswith(PASSES_STAGE):  # recording and solving, interleaved by pass
            slices = {s.key: s for s in self.spans}
            return Span("collect", slices["collect"].start, slices["solve"].end)
        prefixes = {key: prefix for key, prefix, _ in STAGES if prefix}
        for span in self.spans:
            if prefixes.get(span.key) and text.startswith(prefixes[span.key]):
                return span
        # A stage this table does not know: it fills the gap up to the next known slice,
        # so the bar neither jumps back nor past what is left.
        now = self.fraction
        later = [s.start for s in self.spans if s.start > now]
        return Span("other", now, min(later, default=self.span.end))

    def _write_span(self) -> Span:
        return next(s for s in self.spans if s.key == "write")

    def _next_is_write(self) -> bool:
        return self.span.key != "write" and self.span.end == self._write_span().start

    def preview_start(self) -> float:
        """Where the preview's slice of the bar begins (1.0 without one)."""
        return next((s.start for s in self.spans if s.key == "preview"), 1.0)

    def _move(self, fraction: float) -> None:
        step = max(self.state.sampling_step, min(round(fraction * RESOLUTION), RESOLUTION - 1))
        self.state.sampling_step = step
        detail = f" ({self.done} of {self.total})" if self.total > 1 else ""
        self._show(self.text + detail)

    def _show(self, text: str) -> None:
        self.state.textinfo = f"LoRACLR: {text}"
        if self.snapshot is not None:
            self.snapshot.stage = text
            self.snapshot.fraction = self.fraction


class PreviewProgress:
    """The preview grid's progress on ``state``: the last slice of the merge's one bar,
    from ``start`` to 1.

    The WebUI's txt2img drives ``sampling_step``/``sampling_steps`` and calls
    ``state.nextjob()`` (``job_no`` + 1) for each image. With ``job_count = ⌈n / (1 − start)⌉``
    and ``job_no`` starting at ``job_count − n``, the WebUI's own formula
    ``job_no/job_count + sampling_step/(sampling_steps·job_count)`` runs from (just past)
    ``start`` to 1 over the n images, each filled by its sampler's steps: the bar never goes
    back and the ETA (from the merge's start) stays in proportion. The counts are whole
    numbers: Forge's console bar multiplies them by the steps (a real Forge printed
    ``42/117.99999999999994`` with fractional ones). ``snapshot`` names the image.
    """

    def __init__(self, state: Any, snapshot: Snapshot | None = None, start: float = 0.0):
        self.state = state
        self.snapshot = snapshot
        self.start = min(max(start, 0.0), 0.999)
        self.total = 1
        self.done = 0
        self.jobs = 1

    def stage(self, text: str, total: int) -> None:
        self.total, self.done = max(int(total), 1), 0
        self.jobs = math.ceil(self.total / (1.0 - self.start) - 1e-9)
        self.start = 1.0 - self.total / self.jobs
        self.state.job_count = self.jobs
        self.state.job_no = self.jobs - self.total
        self.state.sampling_step, self.state.sampling_steps = 0, 0
        self._show()

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.done + steps, self.total)
        self.state.job_no = self.jobs - self.total + self.done
        self.state.sampling_step = 0
        self._show()

    def interrupted(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))

    def _show(self) -> None:
        shown = min(self.done + 1, self.total)
        text = f"preview image {shown} of {self.total}"
        self.state.textinfo = f"LoRACLR: {text}"
        if self.snapshot is not None:
            self.snapshot.stage = text
            self.snapshot.fraction = self.start + (1 - self.start) * self.done / self.total
