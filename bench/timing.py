"""Shared timing helper for the benchmarks (run them as `python bench/NAME.py`)."""

import statistics
import time


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn (warm up before calling this)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
