"""Timing a piece of work the way every report quotes it: the median over repetitions, after warm-up."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], object] | None = None,
                   calls_per_repeat: int = 1) -> float:
    """Median over ``repeats`` repetitions of the mean wall time of ``fn()``, after ``warmup`` untimed calls.

    A repetition makes ``calls_per_repeat`` consecutive calls, so that waits which come now and
    then (a loader falling behind) count at their average rate, as they do in training. ``sync``
    (e.g. ``torch.cuda.synchronize``) is called after the warm-up and at the end of each
    repetition, so that work queued on an accelerator is inside the time.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls_per_repeat):
            fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) / calls_per_repeat)
    return statistics.median(times)
