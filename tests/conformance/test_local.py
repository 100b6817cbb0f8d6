"""The conformance suite on the in-process backend, world sizes 1-4."""

from __future__ import annotations

import pytest

from collectives.testing import CHECKS, SCENARIOS, run_local
from collectives.testing.device_checks import rank_device, run_device_checks
from tests.conformance.scenario_asserts import (
    assert_gatherv_mismatch,
    assert_mismatch,
    assert_silent_rank,
)

SIZES = [1, 2, 3, 4]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check(name: str, size: int) -> None:
    run_local(size, CHECKS[name], op_timeout=60.0)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_mismatch(size: int) -> None:
    results = run_local(size, lambda comm: SCENARIOS["mismatch"](comm, 2.0), close=False)
    assert_mismatch(dict(enumerate(results)), 2.0)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_silent_rank(size: int) -> None:
    results = run_local(size, lambda comm: SCENARIOS["rank_silent"](comm, 2.0), close=False)
    assert_silent_rank(dict(enumerate(results)), size, 2.0)


@pytest.mark.parametrize("size", [2, 3])
def test_gatherv_mismatch(size: int) -> None:
    results = run_local(size, lambda comm: SCENARIOS["gatherv_mismatch"](comm, 2.0), close=False)
    assert_gatherv_mismatch(dict(enumerate(results)), 2.0)


@pytest.mark.parametrize("size", [1, 3])
def test_device_checks_on_cpu(size: int) -> None:
    # The device checks' own logic, where CI can run it (on a GPU they run per backend: tests/gpu).
    run_local(size, lambda comm: run_device_checks(comm, rank_device("cpu", comm.rank)))
