"""Token-bucket pacing: spread sends at a rate instead of bursting a whole window at once.

Why pace: a model-based controller sends at its estimate of the bottleneck rate; sending a window
back-to-back instead would fill the bottleneck queue (and drop at a shallow one) even when the
average rate is right.  Why a bucket rather than one packet per interval: the IO driver sends GSO
batches (up to ~64 KiB in one ``sendmsg``) and wakes up with timer slack, so the pacer lets a
small burst through and stays exact on average.

The bucket may go into debt: a send larger than what is available is allowed once at least
``min(size, burst)`` is available, and the deficit delays the next one.  That keeps the long-run
rate exact for sends of any size, including ones larger than the burst.

The burst grows with the rate to one :data:`GRANULARITY` of sending: the driver cannot wake up
much more precisely than that, so pacing in finer steps than a millisecond does not smooth
anything, it only costs a timer wakeup per frame and (on loopback at GB/s, where a 64 KiB
interval is ~30 us) caps the rate at what the wakeups can keep up with.  This is also how Linux
sizes a paced flow's bursts: about a millisecond of data at the pacing rate.
"""

from __future__ import annotations

import math

__all__ = ["DEFAULT_BURST", "GRANULARITY", "SHORT_PATH_BURST", "Pacer"]

#: One full GSO batch of 1200-byte datagrams is a little over this; more burst than this builds
#: queues at the bottleneck for no gain.
DEFAULT_BURST = 64 * 1024
#: The finest pacing interval worth a timer (seconds); see the module docstring.
GRANULARITY = 0.001
#: The least burst on a path whose RTT is under a millisecond (loopback, a LAN; see
#: :meth:`Pacer.set_min_burst`): four 64 KiB frames.  There host scheduling, not the wire, sets
#: the delivery rate the pacing rate comes from, so that rate is often several times too low,
#: and every 64 KiB gap is a timer wakeup of a process that shares its cores with the receivers.
#: A frame leaves only whole, so fewer than several frames per wakeup left the sender waiting.
SHORT_PATH_BURST = 256 * 1024


class Pacer:
    """Bytes-per-second token bucket.  ``rate = inf`` turns pacing off.

    Called once or twice per frame, so it is written for few calls: no helper per operation,
    ``math.isinf`` is evaluated where the rate changes (``_off``), not on every use.
    """

    __slots__ = ("_base_burst", "_last", "_off", "_tokens", "burst", "rate")

    def __init__(self, rate: float = math.inf, burst: int = DEFAULT_BURST) -> None:
        if burst <= 0:
            raise ValueError(f"burst must be positive, got {burst}")
        if rate <= 0 or math.isnan(rate):
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self._off = math.isinf(rate)
        self._base_burst = burst
        self.burst = self._burst_for(rate)
        self._tokens = float(self.burst)
        self._last: float | None = None

    def _burst_for(self, rate: float) -> int:
        """The configured burst, or one GRANULARITY at ``rate`` if that is more."""
        if self._off:
            return self._base_burst
        return max(self._base_burst, int(rate * GRANULARITY))

    def _refill(self, now: float) -> None:
        last = self._last
        if last is None or self._off:
            if self._off:
                self._tokens = float(self.burst)
            self._last = now
            return
        if now > last:
            tokens = self._tokens + (now - last) * self.rate
            self._tokens = tokens if tokens < self.burst else float(self.burst)
            self._last = now

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate; time before ``now`` still earns tokens at the old rate."""
        if rate == self.rate:
            return  # the common case once the model settles: nothing to refill for
        if rate <= 0 or math.isnan(rate):
            raise ValueError(f"rate must be positive, got {rate}")
        self._refill(now)
        self.rate = rate
        # _burst_for(rate), inlined: the rate changes on most ACKs while the model moves.
        off = self._off = math.isinf(rate)
        base = self._base_burst
        if off:
            self.burst = base
        else:
            burst = int(rate * GRANULARITY)
            self.burst = burst if burst > base else base  # max(base, burst)

    def next_send_time(self, now: float, size: int) -> float:
        """Earliest time (>= ``now``) at which ``size`` bytes may go out."""
        if self._off:
            return now
        self._refill(now)
        burst = self.burst
        need = float(size if size < burst else burst)
        if self._tokens >= need:
            return now
        return now + (need - self._tokens) / self.rate

    def on_sent(self, size: int, now: float, debt_cap: int | None = None) -> None:
        """Account for ``size`` bytes sent at ``now`` (the caller may have sent early).

        ``debt_cap`` replaces ``max(burst, size)`` as the most debt the send may leave: for a
        batch of datagrams accounted at once, each of which would have been capped at
        ``burst`` (see :meth:`.recovery.Recovery.on_sent_many`).
        """
        if self._off:
            return
        self._refill(now)
        # A send that waited for the pacer never owes more than its own size, so this cap only
        # bites on sends that ignored it (probes bypass pacing): those must not throttle the
        # sends after them for longer than one burst or one such send takes to earn.
        if debt_cap is None:
            debt_cap = size if size > self.burst else self.burst
        tokens = self._tokens - size
        self._tokens = tokens if tokens > -debt_cap else -float(debt_cap)

    def set_min_burst(self, burst: int, now: float) -> None:
        """Let at least ``burst`` bytes out back-to-back from now on (the rate is unchanged)."""
        if burst <= 0:
            raise ValueError(f"burst must be positive, got {burst}")
        if burst == self._base_burst:
            return
        self._refill(now)
        self._base_burst = burst
        self.burst = self._burst_for(self.rate)

    @property
    def tokens(self) -> float:
        """Bytes available at the last update (negative: in debt)."""
        return self._tokens
