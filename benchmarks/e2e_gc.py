"""Keep ComfyUI's periodic ``gc.collect()`` out of the end-to-end benchmark's timings.

ComfyUI's prompt worker (``main.py``) runs ``gc.collect()`` once a prompt has run and more than
``gc_collect_interval`` (10 s) passed since the last one: right after the prompt that ends past
that mark, or, when the server sits idle then, at the mark itself.  On a whole ComfyUI heap that
takes about 0.4 s here, with the GIL held: the server answers nothing meanwhile.  A prompt posted
into it starts late; a follower that collects right after its part of a cluster prompt competes
for the CPU with the leader, which is still gathering, on a machine with fewer cores than ranks.

That is ComfyUI housekeeping, the same with or without the cluster, and it would land on a
random one of a benchmark's prompts.  So :class:`GcClocks` replays the worker's rule for every
rank from the prompts this process queued (the leader runs them all, followers cluster prompts
only), and the benchmark

* posts a prompt only outside the windows where some rank collects or is due to
  (:meth:`GcClocks.clear_time`), and
* when a follower's collection would come at the end of the next timed cluster prompt
  (:meth:`GcClocks.crossing`), first runs an untimed ClusterInfo prompt past the 10 s mark, so
  that it collects then.

The model uses this process's clock and may be off by milliseconds (hence the margins); a prompt
that is hit all the same is caught by the benchmark's disturbed-sample check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GC_INTERVAL_S = 10.0  # ComfyUI main.py: gc_collect_interval
GC_COST_S = 0.6  # allowance for one collection alone on a core (about 0.4 s measured here)
GC_GUARD_S = 0.3  # margin around a prompt's expected span


@dataclass
class GcClock:
    """One server's collection schedule, as ComfyUI's prompt worker keeps it."""

    last: float | None = None  # when it last collected (None: never, so its next prompt will)
    pending: bool = False  # a prompt ran since: an idle-time collection is due at last + interval

    def due(self) -> float | None:
        return self.last + GC_INTERVAL_S if self.pending and self.last is not None else None

    def prompt_started(self, now: float) -> None:
        """Its worker takes a prompt at ``now``: an idle-time collection due before then ran."""
        due = self.due()
        if due is not None and due <= now:
            self.last, self.pending = due, False

    def prompt_ended(self, now: float) -> None:
        """Its worker finished a prompt at ``now``; collects at once when the interval is up."""
        self.prompt_started(now)  # nothing collects during a prompt, only before it
        if self.last is None or now - self.last > GC_INTERVAL_S:
            self.last, self.pending = now, False
        else:
            self.pending = True


class GcClocks:
    """The clocks of one cluster's ranks (index 0 is the leader)."""

    def __init__(self, ranks: int, cpus: int) -> None:
        self.clocks = [GcClock() for _ in range(ranks)]
        # Ranks collect at nearly the same moments; more of them than cores take longer.
        self.cost = GC_COST_S * max(1.0, ranks / max(1, cpus))

    def involved(self, cluster_prompt: bool) -> list[GcClock]:
        return self.clocks if cluster_prompt else self.clocks[:1]

    def clear_time(self, earliest: float, expected: float) -> float:
        """The first moment from ``earliest`` on at which a prompt of ``expected`` seconds can
        start and end with no rank collecting (known collections and due idle-time ones)."""
        start = earliest
        moved = True
        while moved:
            moved = False
            for clock in self.clocks:
                for at in _collections(clock):
                    if at - expected - GC_GUARD_S <= start < at + self.cost:
                        start, moved = at + self.cost, True
        return start

    def crossing(self, start: float, expected: float) -> list[GcClock]:
        """Followers that would collect at the end of a cluster prompt starting at ``start``:
        no idle-time collection is due on them, but the prompt ends past their 10 s mark.

        Empty when the prompt is too long for any schedule to keep collections out of it.
        """
        if expected + 2 * GC_GUARD_S >= GC_INTERVAL_S:
            return []
        end = start + expected + GC_GUARD_S
        return [
            clock
            for clock in self.clocks[1:]
            if not clock.pending and (clock.last is None or clock.last + GC_INTERVAL_S < end)
        ]

    @staticmethod
    def mark(clocks: Sequence[GcClock]) -> float:
        """When all of ``clocks`` are past their 10 s mark (-inf when they already may be)."""
        marks = [c.last + GC_INTERVAL_S for c in clocks if c.last is not None]
        return max(marks) if marks else -math.inf

    @staticmethod
    def started(clocks: Iterable[GcClock], now: float) -> None:
        for clock in clocks:
            clock.prompt_started(now)

    @staticmethod
    def ended(clocks: Iterable[GcClock], now: float) -> None:
        for clock in clocks:
            clock.prompt_ended(now)


def _collections(clock: GcClock) -> list[float]:
    """Collections that may still be running or are due: the last one and the next one."""
    times = [] if clock.last is None else [clock.last]
    due = clock.due()
    if due is not None:
        times.append(due)
    return times


__all__ = ["GC_COST_S", "GC_GUARD_S", "GC_INTERVAL_S", "GcClock", "GcClocks"]
