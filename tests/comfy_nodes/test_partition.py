"""Deterministic contiguous splits, even and weighted."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from comfy_nodes.partition import (
    WEIGHTS_ENV,
    parse_weights,
    resolve_weights,
    split_counts,
    split_ranges,
)


@pytest.mark.parametrize(
    ("total", "size", "counts"),
    [
        (8, 4, [2, 2, 2, 2]),
        (10, 4, [3, 3, 2, 2]),  # the first total % size ranks get one more
        (5, 2, [3, 2]),
        (2, 4, [1, 1, 0, 0]),  # ranks with nothing to do
        (0, 3, [0, 0, 0]),
        (7, 1, [7]),
    ],
)
def test_even_split(total: int, size: int, counts: list[int]) -> None:
    assert split_counts(total, [1] * size) == counts
    ranges = split_ranges(total, size)
    assert [b - a for a, b in ranges] == counts
    assert ranges[0][0] == 0 and ranges[-1][1] == total


@pytest.mark.parametrize(
    ("total", "weights", "counts"),
    [
        (8, "3,1", [6, 2]),
        (5, "3,1", [4, 1]),  # quotas 3.75, 1.25: the larger remainder wins
        (7, "1,1,2", [2, 2, 3]),  # quotas 1.75, 1.75, 3.5: tie of .75 goes to the lower ranks
        (4, "1 0 1", [2, 0, 2]),  # a zero weight takes nothing
        (3, "0.5,1.5", [1, 2]),  # quotas 0.75, 2.25
        (10, "2,2", [5, 5]),
    ],
)
def test_weighted_split(total: int, weights: str, counts: list[int]) -> None:
    ws = parse_weights(weights, len(counts))
    assert split_counts(total, ws) == counts


@pytest.mark.parametrize(
    ("spec", "size", "message"),
    [
        ("1,1", 3, "2 weight"),
        ("1,-1", 2, "negative"),
        ("0,0", 2, "all zero"),
        ("a,1", 2, "not a number"),
    ],
)
def test_bad_weights_are_refused_clearly(spec: str, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_weights(spec, size)


def test_weights_come_from_the_node_then_the_environment() -> None:
    env = {WEIGHTS_ENV: "3,1"}
    assert resolve_weights("1,1", 2, env) == [1, 1]
    assert resolve_weights("", 2, env) == [3, 1]
    assert resolve_weights(None, 2, {}) == [1, 1]
    with pytest.raises(ValueError, match=WEIGHTS_ENV):
        resolve_weights("", 3, env)


@given(
    total=st.integers(0, 500),
    weights=st.lists(st.integers(0, 9), min_size=1, max_size=9).filter(any),
)
def test_split_is_a_contiguous_cover_close_to_the_quotas(total: int, weights: list[int]) -> None:
    ranges = split_ranges(total, len(weights), weights)
    assert ranges == split_ranges(total, len(weights), weights)  # deterministic
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a <= b for a, b in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    whole = sum(weights)
    for (a, b), w in zip(ranges, weights, strict=True):
        quota = Fraction(total * w, whole)
        assert abs((b - a) - quota) < 1  # largest remainder: never a whole item off its quota
        if w == 0:
            assert a == b


@given(total=st.integers(0, 300), size=st.integers(1, 16))
def test_equal_weights_give_the_even_split(total: int, size: int) -> None:
    counts = split_counts(total, [1] * size)
    assert counts == [total // size + (1 if r < total % size else 0) for r in range(size)]
    assert split_counts(total, [5] * size) == counts
