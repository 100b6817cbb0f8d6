"""The conformance suite on the udp backend: ranks are real processes on loopback, started by
the launcher (env discovery through rank 0's authenticated store, the launcher's cluster key)."""

from __future__ import annotations

import pytest

from collectives.testing import CHECKS
from tests.conformance.scenario_asserts import (
    SLACK_S,
    assert_gatherv_mismatch,
    assert_mismatch,
    assert_silent_rank,
)
from tests.conformance.worlds import check_result, run_world

pytestmark = pytest.mark.udp

SIZES = [1, 2, 3, 4, 5, 8]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check(name: str, size: int) -> None:
    check_result("udp", size, name)


@pytest.mark.parametrize("size", [2, 4])
def test_mismatch(size: int) -> None:
    world = run_world("udp", size, "mismatch", 3.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert len(results) == size, world["log"][-3000:]
    assert_mismatch(results, 3.0)


@pytest.mark.parametrize("size", [2, 3])
def test_silent_rank(size: int) -> None:
    world = run_world("udp", size, "rank_silent", 3.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert_silent_rank(results, size, 3.0)


@pytest.mark.parametrize("size", [2, 3])
def test_rank_exit(size: int) -> None:
    world = run_world("udp", size, "rank_exit", 5.0)
    assert world["returncode"] != 0, "the launcher must report the rank that exited"
    for rank in range(size - 1):
        res = world["reports"][rank]["scenario"]
        err = res.get("error")
        assert err and err.startswith(("CollectiveTimeoutError", "ConnectionLostError")), (
            rank,
            res,
        )
        assert res["elapsed"] < 5.0 + SLACK_S


@pytest.mark.parametrize("size", [2, 3])
def test_gatherv_mismatch(size: int) -> None:
    world = run_world("udp", size, "gatherv_mismatch", 5.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert len(results) == size, world["log"][-3000:]
    assert_gatherv_mismatch(results, 5.0)
