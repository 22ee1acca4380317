"""Time and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass
class Measured:
    """Wall time (s), peak memory growth (MiB) and the call's result.

    ``peak_mib``: on CUDA the allocator's peak beyond what was allocated before, elsewhere
    the process's resident memory (RSS) growth; ``host_peak_mib``: RSS growth everywhere.
    """

    seconds: float
    peak_mib: float
    result: object
    host_peak_mib: float = 0.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # give freed heap pages back (glibc) for a fair baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _RssPeak:
    """Samples the resident set size every millisecond in a thread; ``growth`` in bytes."""

    def __init__(self) -> None:
        _trim()
        self.base = self.peak = _rss_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak - self.base


def measure(fn: Callable[[], T], device: torch.device) -> Measured:
    """Run ``fn`` once; peak device memory (CUDA) or RSS growth, and RSS growth."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
    rss = _RssPeak()
    t0 = time.perf_counter()
    try:
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        seconds = time.perf_counter() - t0
        host = rss.stop() / 2**20
    peak = (torch.cuda.max_memory_allocated(device) - start_mem) / 2**20 if cuda else host
    return Measured(seconds, peak, result, host)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Print a GitHub-style markdown table with aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
