"""``modules.progress``: what the WebUI's progress API (``POST /internal/progress``) makes of
``shared.state``, as research a1111.md §2.6 describes it.

One job's progress is ``job_no/job_count + sampling_step/(sampling_steps·job_count)``
(0 while ``job_count`` ≤ 0), capped at 1; the ETA is ``elapsed/progress − elapsed`` with
``elapsed`` counted from ``state.time_start``. The browser test serves :func:`answer` at
``/internal/progress`` for its stand-in ``requestProgress``.
"""

from __future__ import annotations

import time

from modules import call_queue, shared


def progress_of(state, now: float | None = None) -> tuple[float, float | None]:
    """(progress 0–1, ETA in seconds or ``None``) for ``state``, the WebUI's way."""
    value = 0.0
    if state.job_count > 0:
        value += state.job_no / state.job_count
        if state.sampling_steps > 0:
            value += state.sampling_step / state.sampling_steps / state.job_count
    value = min(value, 1.0)
    if value <= 0 or state.time_start is None:
        return value, None
    elapsed = (now or time.time()) - state.time_start
    return value, elapsed / value - elapsed


def answer(id_task: str) -> dict:
    """The progress API's reply for one task id."""
    state = shared.state
    active = bool(id_task) and state.job == id_task
    completed = id_task in call_queue.finished
    queued = id_task in call_queue.calls and not active and not completed
    value, eta = progress_of(state) if active else (0.0, None)
    return {
        "active": active,
        "queued": queued,
        "completed": completed,
        "progress": value if active else None,
        "eta": eta,
        "textinfo": state.textinfo if active else ("Waiting..." if queued else None),
    }
