"""Timing shared by the benchmark scripts: per-call seconds after warm-up, and the load average to quote.

The scripts run as `python benchmarks/<script>.py`, so they import this as `timing`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def call_seconds(fn: Callable[[int], object], calls: int, *, warmup: int = 1,
                 setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each call fn(0) .. fn(calls - 1), after `warmup` untimed calls fn(0).

    `setup`, when given, runs untimed before every call (warm-up ones too), e.g. to restore a cache.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn(0)
    samples = []
    for i in range(calls):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
    return samples


def median_seconds(fn: Callable[[int], object], calls: int, **kwargs) -> float:
    """The median of `call_seconds(fn, calls, **kwargs)`."""
    return statistics.median(call_seconds(fn, calls, **kwargs))


def best_seconds(fn: Callable[[int], object], calls: int, **kwargs) -> float:
    """The fastest of `call_seconds(fn, calls, **kwargs)`: what the code does when nothing competes with it."""
    return min(call_seconds(fn, calls, **kwargs))


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none), quoted with every result on a shared machine."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
