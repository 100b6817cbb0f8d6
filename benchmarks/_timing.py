"""Interleaved, barrier-started timing of a few calls that do the same job.

Drift on a shared, noisy machine (other tenants, CPU frequency, page cache) hits every variant
alike when repetitions alternate between them, so ratios stay honest even when absolute times
wander.  Each repetition starts with a barrier so that no rank times another rank's lateness;
every rank keeps its own samples and the report takes the busiest rank's median.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Call = Callable[[], object]


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure one cell.  ``iters=None`` scales repetitions to ``cell_seconds``."""

    iters: int | None = None
    cell_seconds: float = 0.5
    min_reps: int = 5  # medians of fewer are too easily fooled on a noisy box...
    max_reps: int = 2000
    slow_round_s: float = 1.0  # ...but a round slower than this (128M, 4 ranks) caps at 3
    slow_min_reps: int = 3
    big_bytes: int = 64 << 20  # one warm-up round is enough from here on

    def warmup_rounds(self, nbytes: int) -> int:
        if self.iters is not None or nbytes >= self.big_bytes:
            return 1
        return 2 if nbytes >= 1 << 20 else 3

    def reps_for(self, round_seconds: float) -> int:
        """Repetitions for a cell whose one round (every variant once) takes ``round_seconds``."""
        if self.iters is not None:
            return self.iters
        floor = self.slow_min_reps if round_seconds > self.slow_round_s else self.min_reps
        wanted = math.ceil(self.cell_seconds / max(round_seconds, 1e-9))
        return max(floor, min(self.max_reps, wanted))


@dataclass(frozen=True)
class CellTimes:
    reps: int
    warmup: int
    samples: dict[str, list[float]]  # variant -> seconds per repetition, in repetition order


def time_interleaved(
    calls: Mapping[str, Call],
    barrier: Callable[[], None],
    agree_max: Callable[[float], float],
    plan: TimingPlan,
    nbytes: int,
) -> CellTimes:
    """Warm up, agree on a repetition count with the other ranks, then time ``calls`` in turn.

    Every rank must call this with the same variant names in the same order: the barriers and
    the collectives themselves pair up across ranks.
    """
    names = list(calls)
    warmup = plan.warmup_rounds(nbytes)
    round_seconds = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        for name in names:
            barrier()
            calls[name]()
        round_seconds = time.perf_counter() - start
    # Decisions that depend on the clock must be the same on every rank, or the ranks desync.
    target = plan.reps_for(agree_max(round_seconds))

    samples: dict[str, list[float]] = {name: [] for name in names}
    done, spent = 0, 0.0
    # A warm-up round can run slow (first touch, a noisy neighbour), which would leave the cell
    # short: once the planned repetitions are in, re-plan from their own pace and top up.
    for _ in range(_REPLANS):
        start = time.perf_counter()
        _timed_rounds(calls, names, barrier, range(done, target), samples)
        spent += time.perf_counter() - start
        done = target
        if plan.iters is not None:
            break
        target = max(target, plan.reps_for(agree_max(spent / done)))
        if target == done:
            break
    return CellTimes(done, warmup, samples)


_REPLANS = 3


def _timed_rounds(
    calls: Mapping[str, Call],
    names: list[str],
    barrier: Callable[[], None],
    reps: range,
    samples: dict[str, list[float]],
) -> None:
    order = len(names)
    # A cyclic collection landing in one variant's repetition is noise, not that variant's cost.
    # (No gc.collect() first: with torch loaded one takes ~0.2 s, and buffers die by refcount.)
    gc.disable()
    try:
        for rep in reps:
            for step in range(order):
                name = names[(rep + step) % order]  # rotate who goes first
                call = calls[name]
                barrier()
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()


def median(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
