"""The destructive scenarios (mismatched calls, a silent rank, a rank whose process exits, a
gatherv block of the wrong size) on every backend whose ranks are processes started by the
launcher: each runs on a fresh world, and every rank must end with the expected typed error."""

from __future__ import annotations

import pytest

from tests.conformance.scenario_asserts import (
    SLACK_S,
    assert_gatherv_mismatch,
    assert_mismatch,
    assert_silent_rank,
)
from tests.conformance.worlds import run_world

BACKENDS = [
    pytest.param("gloo", marks=pytest.mark.gloo),
    pytest.param("udp", marks=pytest.mark.udp),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [2, 4])
def test_mismatch(backend: str, size: int) -> None:
    world = run_world(backend, size, "mismatch", 3.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert len(results) == size, world["log"][-3000:]
    assert_mismatch(results, 3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [2, 3])
def test_silent_rank(backend: str, size: int) -> None:
    world = run_world(backend, size, "rank_silent", 3.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert_silent_rank(results, size, 3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [2, 3])
def test_rank_exit(backend: str, size: int) -> None:
    world = run_world(backend, size, "rank_exit", 5.0)
    assert world["returncode"] != 0, "the launcher must report the rank that exited"
    for rank in range(size - 1):
        res = world["reports"][rank]["scenario"]
        err = res.get("error")
        assert err and err.startswith(("CollectiveTimeoutError", "ConnectionLostError")), (
            rank,
            res,
        )
        assert res["elapsed"] < 5.0 + SLACK_S


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [2, 3])
def test_gatherv_mismatch(backend: str, size: int) -> None:
    world = run_world(backend, size, "gatherv_mismatch", 5.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert len(results) == size, world["log"][-3000:]
    assert_gatherv_mismatch(results, 5.0)
