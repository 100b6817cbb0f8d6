"""Round-trip time estimation (RFC 9002 section 5) and a windowed min/max filter.

The RFC keeps ``min_rtt`` for the life of a connection.  Our sessions live for hours and their
path can change under them (a VPN reroutes, a NAT rebinds), and a stale, too-small ``min_rtt``
makes the ACK-delay rule below reject honest delay reports and makes congestion control size its
window for a path that no longer exists.  So ``min_rtt`` here is the minimum over a sliding window
(about 10 s), kept with the three-sample windowed filter that BBR made common: O(1) time and space
whatever the sample rate.
"""

from __future__ import annotations

__all__ = ["GRANULARITY", "RttEstimator", "WindowedFilter"]

#: Timer granularity (RFC 9002's kGranularity): the smallest variance term a PTO may use, so that
#: a perfectly steady RTT does not produce a timer that fires on the tiniest jitter.
GRANULARITY = 0.001

#: How long a minimum RTT is trusted without being seen again.
MIN_RTT_WINDOW = 10.0


class WindowedFilter:
    """Best (max or min) of the samples seen over the last ``window`` units of ``t``.

    Keeps the best, second-best and third-best samples of successive sub-windows, so that when
    the best one ages out a recent, nearly-as-good value takes over instead of the estimate
    jumping to whatever the next sample happens to be.  ``t`` is any non-decreasing number: time
    in seconds for RTT, a round-trip count for bandwidth.
    """

    __slots__ = ("_max", "_t", "_v", "window")

    def __init__(self, window: float, *, maximum: bool) -> None:
        self.window = window
        # "Better" is >= for a max filter, <= for a min one: written out as compares in
        # update(), not a comparison function per sample (the filters run on every ACK).
        self._max = maximum
        self._v: list[float] = []
        self._t: list[float] = []

    def reset(self, value: float, t: float) -> None:
        self._v = [value, value, value]
        self._t = [t, t, t]

    def get(self) -> float | None:
        return self._v[0] if self._v else None

    def update(self, value: float, t: float) -> float:
        """Add a sample taken at ``t``; return the current best."""
        v, ts, mx, win = self._v, self._t, self._max, self.window
        if not v or (value >= v[0] if mx else value <= v[0]) or t - ts[2] > win:
            # A new best, or nothing in the window is recent: start over from this sample
            # (reset(), in place once the lists exist: this is most samples of a rising rate).
            if not v:
                self.reset(value, t)
            else:
                v[0] = v[1] = v[2] = value
                ts[0] = ts[1] = ts[2] = t
            return value
        if value >= v[1] if mx else value <= v[1]:
            v[1] = v[2] = value
            ts[1] = ts[2] = t
        elif value >= v[2] if mx else value <= v[2]:
            v[2] = value
            ts[2] = t
        age = t - ts[0]
        if age > win:
            # The best aged out: promote the runners-up and refill the tail with this sample.
            v[0], v[1], v[2] = v[1], v[2], value
            ts[0], ts[1], ts[2] = ts[1], ts[2], t
            if t - ts[0] > win:
                v[0], v[1] = v[1], v[2]
                ts[0], ts[1] = ts[1], ts[2]
        elif ts[1] == ts[0] and age > win / 4:
            # A quarter window passed with one distinct sample: keep a fresher second choice.
            v[1] = v[2] = value
            ts[1] = ts[2] = t
        elif ts[2] == ts[1] and age > win / 2:
            v[2] = value
            ts[2] = t
        return v[0]


class RttEstimator:
    """Smoothed RTT, its variation and the (windowed) minimum, from ACK samples.

    Before the first sample ``smoothed`` is ``initial_rtt`` and ``rttvar`` half of it, as
    RFC 9002 section 5.3 prescribes, so that the first PTO is a sane multiple of the guess.
    """

    __slots__ = ("_min_filter", "has_sample", "latest", "min_rtt", "rttvar", "smoothed")

    def __init__(self, initial_rtt: float, min_rtt_window: float = MIN_RTT_WINDOW) -> None:
        if initial_rtt <= 0:
            raise ValueError(f"initial_rtt must be positive, got {initial_rtt}")
        self.has_sample = False
        self.latest = 0.0
        self.smoothed = initial_rtt
        self.rttvar = initial_rtt / 2
        self.min_rtt = float("inf")
        self._min_filter = WindowedFilter(min_rtt_window, maximum=False)

    def update(self, sample: float, ack_delay: float, now: float) -> None:
        """Take one RTT sample (ACK arrival minus send time) with the peer's reported delay."""
        if sample <= 0:
            # A zero or negative sample means a broken clock upstream; it carries no information.
            return
        self.latest = sample
        self.min_rtt = self._min_filter.update(sample, now)
        if not self.has_sample:
            self.has_sample = True
            self.smoothed = sample
            self.rttvar = sample / 2
            return
        # The ACK delay is the receiver's own time; subtract it only when what is left is still
        # a possible path RTT (>= min_rtt), so that a wrong report cannot shrink the estimate
        # below what the path has shown.
        adjusted = sample
        if ack_delay > 0 and sample - ack_delay >= self.min_rtt:
            adjusted = sample - ack_delay
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.smoothed - adjusted)
        self.smoothed = 0.875 * self.smoothed + 0.125 * adjusted

    def pto(self, max_ack_delay: float) -> float:
        """The probe timeout, before exponential backoff (RFC 9002 section 6.2.1)."""
        return self.smoothed + max(4 * self.rttvar, GRANULARITY) + max_ack_delay
