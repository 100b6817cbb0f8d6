"""RangeSet: merging, bounds, discard_below, and agreement with a plain set model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.transport.ranges import RangeSet


def ranges(rs: RangeSet) -> list[tuple[int, int]]:
    return list(rs)


def test_empty() -> None:
    rs = RangeSet()
    assert len(rs) == 0
    assert ranges(rs) == []
    assert 0 not in rs
    assert rs.first() is None and rs.last() is None


def test_single_numbers_merge_when_adjacent() -> None:
    rs = RangeSet()
    for n in (0, 1, 2, 4, 5):
        rs.add(n)
    assert ranges(rs) == [(0, 3), (4, 6)]
    rs.add(3)
    assert ranges(rs) == [(0, 6)]


def test_add_below_and_between_merges_everything_it_touches() -> None:
    rs = RangeSet(ranges=[(10, 12), (14, 16), (20, 22), (30, 31)])
    rs.add(11, 21)
    assert ranges(rs) == [(10, 22), (30, 31)]
    rs.add(0, 2)
    assert ranges(rs) == [(0, 2), (10, 22), (30, 31)]
    rs.add(2, 10)
    assert ranges(rs) == [(0, 22), (30, 31)]


def test_add_inside_existing_range_is_a_noop() -> None:
    rs = RangeSet(ranges=[(0, 10)])
    rs.add(3, 5)
    assert ranges(rs) == [(0, 10)]


def test_empty_range_ignored_reversed_rejected() -> None:
    rs = RangeSet()
    rs.add(5, 5)
    assert len(rs) == 0
    with pytest.raises(ValueError):
        rs.add(5, 4)
    with pytest.raises(ValueError):
        RangeSet(max_ranges=0)


def test_contains_at_edges() -> None:
    rs = RangeSet(ranges=[(2, 4), (6, 7)])
    assert [x for x in range(9) if x in rs] == [2, 3, 6]
    assert "2" not in rs


def test_discard_below_cuts_a_crossing_range() -> None:
    rs = RangeSet(ranges=[(0, 3), (5, 10), (12, 14)])
    rs.discard_below(7)
    assert ranges(rs) == [(7, 10), (12, 14)]
    rs.discard_below(10)
    assert ranges(rs) == [(12, 14)]
    rs.discard_below(100)
    assert ranges(rs) == []


def test_over_max_ranges_drops_the_lowest() -> None:
    rs = RangeSet(max_ranges=3)
    for n in range(0, 10, 2):
        rs.add(n)
    assert ranges(rs) == [(4, 5), (6, 7), (8, 9)]
    rs.add(0)  # a new lowest range is dropped at once: the top is what ACKs must carry
    assert ranges(rs) == [(4, 5), (6, 7), (8, 9)]


def test_helpers() -> None:
    rs = RangeSet(ranges=[(1, 3), (5, 9)])
    assert rs.first() == 1 and rs.last() == 8
    assert rs.count() == 6
    assert list(reversed(rs)) == [(5, 9), (1, 3)]
    assert rs.covers(5, 9) and rs.covers(6, 7) and rs.covers(3, 3)
    assert not rs.covers(2, 6) and not rs.covers(0, 2)
    assert rs == RangeSet(ranges=[(5, 9), (1, 3)])
    assert rs != RangeSet(ranges=[(1, 3)])


def intervals_of(numbers: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if out and out[-1][1] == n:
            out[-1] = (out[-1][0], n + 1)
        else:
            out.append((n, n + 1))
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 12)), max_size=60),
    st.integers(0, 220),
)
def test_matches_a_set_model(adds: list[tuple[int, int]], cut: int) -> None:
    rs = RangeSet(max_ranges=10_000)
    model: set[int] = set()
    for start, length in adds:
        rs.add(start, start + length)
        model.update(range(start, start + length))
        assert ranges(rs) == intervals_of(model)
    assert all((x in rs) == (x in model) for x in range(-1, 215))
    rs.discard_below(cut)
    assert ranges(rs) == intervals_of({x for x in model if x >= cut})


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=120), st.integers(1, 8))
def test_bounded_set_keeps_the_top_ranges(adds: list[int], bound: int) -> None:
    rs = RangeSet(max_ranges=bound)
    for n in adds:
        rs.add(n)
        assert len(rs) <= bound
    # Whatever survived is a subset of what was added, and the highest number always survives.
    assert all(a < b for a, b in rs)
    if adds:
        assert max(adds) in rs
        assert all(x in set(adds) for a, b in rs for x in range(a, b))
