"""The conformance suite on mpi4py, under a real ``mpiexec -n 1..4``."""

from __future__ import annotations

import pytest

from collectives.testing import CHECKS
from tests.conformance.scenario_asserts import (
    assert_gatherv_mismatch,
    assert_mismatch,
    assert_silent_rank,
)
from tests.conformance.worlds import check_result, run_world

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check(name: str, size: int) -> None:
    check_result("mpi", size, name)


@pytest.mark.parametrize("size", [2, 4])
def test_mismatch(size: int) -> None:
    world = run_world("mpi", size, "mismatch", 3.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert len(results) == size, world["log"][-3000:]
    assert_mismatch(results, 3.0)


@pytest.mark.parametrize("size", [2, 3])
def test_silent_rank(size: int) -> None:
    # Under MPI a process that exits takes the whole job down (mpiexec's policy), so the
    # "rank that stops answering" case is a rank that never joins the collective.
    world = run_world("mpi", size, "rank_silent", 3.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert_silent_rank(results, size, 3.0)


@pytest.mark.parametrize("size", [2, 3])
def test_gatherv_mismatch(size: int) -> None:
    world = run_world("mpi", size, "gatherv_mismatch", 5.0)
    results = {r: rep["scenario"] for r, rep in world["reports"].items()}
    assert len(results) == size, world["log"][-3000:]
    assert_gatherv_mismatch(results, 5.0)
