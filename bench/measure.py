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
    """Wall time (s) and peak memory growth (MiB) of one call, with its result."""

    seconds: float
    peak_mib: float
    result: object


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # give freed heap pages back (glibc) for a fair baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn: Callable[[], T], device: torch.device) -> Measured:
    """Run ``fn`` once; on CUDA peak allocated memory, on CPU peak RSS growth sampled at 1 ms."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) - start_mem
        return Measured(seconds, peak / 2**20, result)
    _trim()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return Measured(seconds, (peak[0] - base) / 2**20, result)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Print a GitHub-style markdown table with aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
