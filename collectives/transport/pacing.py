"""Token-bucket pacing: spread sends at a rate instead of bursting a whole window at once.

Why pace: a model-based controller sends at its estimate of the bottleneck rate; sending a window
back-to-back instead would fill the bottleneck queue (and drop at a shallow one) even when the
average rate is right.  Why a bucket rather than one packet per interval: the IO driver sends GSO
batches (up to ~64 KiB in one ``sendmsg``) and wakes up with timer slack, so the pacer lets a
small burst through and stays exact on average.

The bucket may go into debt: a send larger than what is available is allowed once at least
``min(size, burst)`` is available, and the deficit delays the next one.  That keeps the long-run
rate exact for sends of any size, including ones larger than the burst.
"""

from __future__ import annotations

import math

__all__ = ["DEFAULT_BURST", "Pacer"]

#: One full GSO batch of 1200-byte datagrams is a little over this; more burst than this builds
#: queues at the bottleneck for no gain.
DEFAULT_BURST = 64 * 1024


class Pacer:
    """Bytes-per-second token bucket.  ``rate = inf`` turns pacing off."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float = math.inf, burst: int = DEFAULT_BURST) -> None:
        if burst <= 0:
            raise ValueError(f"burst must be positive, got {burst}")
        if rate <= 0 or math.isnan(rate):
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is None or math.isinf(self.rate):
            self._tokens = float(self.burst) if math.isinf(self.rate) else self._tokens
            self._last = now
            return
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._last = now

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate; time before ``now`` still earns tokens at the old rate."""
        if rate <= 0 or math.isnan(rate):
            raise ValueError(f"rate must be positive, got {rate}")
        self._refill(now)
        self.rate = rate

    def next_send_time(self, now: float, size: int) -> float:
        """Earliest time (>= ``now``) at which ``size`` bytes may go out."""
        if math.isinf(self.rate):
            return now
        self._refill(now)
        need = min(float(size), float(self.burst))
        if self._tokens >= need:
            return now
        return now + (need - self._tokens) / self.rate

    def on_sent(self, size: int, now: float) -> None:
        """Account for ``size`` bytes sent at ``now`` (the caller may have sent early)."""
        if math.isinf(self.rate):
            return
        self._refill(now)
        # A send that waited for the pacer never owes more than its own size, so this cap only
        # bites on sends that ignored it (probes bypass pacing): those must not throttle the
        # sends after them for longer than one burst or one such send takes to earn.
        self._tokens = max(self._tokens - size, -float(max(self.burst, size)))

    @property
    def tokens(self) -> float:
        """Bytes available at the last update (negative: in debt)."""
        return self._tokens
