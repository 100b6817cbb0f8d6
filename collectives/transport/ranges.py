"""Sets of packet numbers as sorted, merged half-open intervals.

Both ends of the transport use this: the receiver to remember which segment numbers arrived (and
to write them into ACKs), the sender to read ACKs.  Packet numbers count up, so nearly every
``add`` extends the top range or appends just above it; that case is O(1), anything else is a
bisect plus one list splice.

The set is bounded (``max_ranges``): a long-lived session with scattered loss would otherwise grow
its ACKs without limit.  When over the bound the *lowest* ranges go, because the sender learnt
about them from earlier ACKs already; the newest information is what an ACK must carry.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

__all__ = ["RangeSet"]


class RangeSet:
    """Half-open integer intervals ``[start, stop)``, sorted ascending and never touching.

    Two parallel lists (starts, stops) rather than a list of tuples: ``bisect`` then works on
    plain ints, and extending the top range is a single list store.
    """

    __slots__ = ("_max_ranges", "_starts", "_stops")

    def __init__(self, max_ranges: int = 256, ranges: Iterable[tuple[int, int]] = ()) -> None:
        if max_ranges < 1:
            raise ValueError(f"max_ranges must be >= 1, got {max_ranges}")
        self._max_ranges = max_ranges
        self._starts: list[int] = []
        self._stops: list[int] = []
        for start, stop in ranges:
            self.add(start, stop)

    @property
    def max_ranges(self) -> int:
        return self._max_ranges

    def add(self, start: int, stop: int | None = None) -> None:
        """Add ``[start, stop)`` (``stop`` defaults to ``start + 1``: one number)."""
        if stop is None:
            stop = start + 1
        if stop <= start:
            if stop < start:
                raise ValueError(f"empty or reversed range [{start}, {stop})")
            return
        starts, stops = self._starts, self._stops
        if not starts or start > stops[-1]:
            # New top range: the common case once the top one has a gap below the new number.
            starts.append(start)
            stops.append(stop)
            if len(starts) > self._max_ranges:
                self._trim()
            return
        if start >= starts[-1]:
            # Overlaps or touches the top range: extend it in place.
            stops[-1] = max(stops[-1], stop)
            return
        self._insert(start, stop)

    def _insert(self, start: int, stop: int) -> None:
        starts, stops = self._starts, self._stops
        # Every range that overlaps or touches [start, stop) is merged: those with
        # stop >= start and start <= stop.
        lo = bisect_left(stops, start)
        hi = bisect_right(starts, stop)
        if lo < hi:
            start = min(start, starts[lo])
            stop = max(stop, stops[hi - 1])
        starts[lo:hi] = [start]
        stops[lo:hi] = [stop]
        if len(starts) > self._max_ranges:
            self._trim()

    def _trim(self) -> None:
        excess = len(self._starts) - self._max_ranges
        del self._starts[:excess]
        del self._stops[:excess]

    def discard_below(self, x: int) -> None:
        """Forget every number below ``x`` (a range crossing ``x`` is cut at ``x``)."""
        starts, stops = self._starts, self._stops
        i = bisect_right(stops, x)
        if i:
            del starts[:i]
            del stops[:i]
        if starts and starts[0] < x:
            starts[0] = x

    def __contains__(self, x: object) -> bool:
        if not isinstance(x, int):
            return False
        i = bisect_right(self._starts, x) - 1
        return i >= 0 and x < self._stops[i]

    def covers(self, start: int, stop: int) -> bool:
        """True when every number of ``[start, stop)`` is in the set (an empty range is)."""
        if stop <= start:
            return True
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and stop <= self._stops[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._stops, strict=True)

    def __reversed__(self) -> Iterator[tuple[int, int]]:
        """Newest ranges first: what an ACK with limited room should carry."""
        return zip(reversed(self._starts), reversed(self._stops), strict=True)

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._stops == other._stops

    __hash__ = None  # type: ignore[assignment]  # mutable

    def first(self) -> int | None:
        """The lowest number in the set, or None when empty."""
        return self._starts[0] if self._starts else None

    def last(self) -> int | None:
        """The highest number in the set, or None when empty."""
        return self._stops[-1] - 1 if self._stops else None

    def count(self) -> int:
        """How many numbers (not ranges) the set holds."""
        return sum(self._stops) - sum(self._starts)

    def __repr__(self) -> str:
        inner = ", ".join(f"[{a}, {b})" for a, b in self)
        return f"RangeSet({inner})"
