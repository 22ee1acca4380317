"""``modules.shared_state.State`` (the fields and methods the dossier lists)."""

from __future__ import annotations

import time


class State:
    def __init__(self) -> None:
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = False
        self.skipped = False
        self.begun = 0
        self.time_start = None

    def begin(self, job: str = "(unknown)") -> None:
        self.job, self.job_no, self.job_count = job, 0, -1
        self.sampling_step, self.sampling_steps, self.textinfo = 0, 0, None
        self.interrupted = self.skipped = False
        self.time_start = time.time()
        self.begun += 1

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0

    def end(self) -> None:
        self.job, self.job_count = "", 0

    def interrupt(self) -> None:
        self.interrupted = True
