"""``modules.call_queue``: the generation lock and the gradio GPU-call wrapper.

``wrap_gradio_gpu_call`` behaves as the dossier describes (§2.6): a ``task(...)`` first
argument is the job id; under ``queue_lock`` it begins and ends a ``shared.state`` job;
exceptions become ``extra_outputs + [error html]``; timing HTML is appended to the last
output, which must therefore be a string.
"""

from __future__ import annotations

import html
import threading
import time

from modules import shared

queue_lock = threading.Lock()
calls: list[str] = []
finished: list[str] = []


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        id_task = (
            args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        )
        calls.append(id_task or "")
        started = time.perf_counter()
        with queue_lock:
            shared.state.begin(job=id_task or "")
            try:
                res = list(func(*args, **kwargs))
            except Exception as exc:
                res = [
                    *list(extra_outputs or []),
                    f"<div class='error'>{html.escape(str(exc))}</div>",
                ]
            finally:
                shared.state.end()
                finished.append(id_task or "")
        shared.state.interrupted = False
        shared.state.job_count = 0
        res[-1] += (
            f"<div class='performance'>Time taken: {time.perf_counter() - started:.2f} sec.</div>"
        )
        return tuple(res)

    return f
