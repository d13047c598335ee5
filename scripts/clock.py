"""The benchmarks' clock and GPU memory reading (torch only, shared by scripts/benchmark.py and
scripts/eap_ig_reference.py, which cannot import this package)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one warm-up call; GPU work is waited for."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_gpu_mb(device: str) -> float | None:
    """Peak GPU memory allocated since the last reading (MB), None off CUDA; resets the peak."""
    if not device.startswith("cuda"):
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return peak
