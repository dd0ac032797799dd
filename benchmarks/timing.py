"""Round-robin timing shared by the benchmarks; needs neither PyTorch nor signgrad, so
that a benchmark running in another library's environment can use it too."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each function, measured round-robin: one call of
    each in turn, so that a noisy machine's drifts hit every contender alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}
