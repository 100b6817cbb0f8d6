"""The decisions of the MPI allgather tuning that need no MPI: when it stays out of the way.

The real path (MPICH, 2-4 ranks, read back through MPI_T) is tested under mpiexec in
test_mpi_unit.py; here the MPI side is a stand-in that fails the test if it is touched.
"""

from __future__ import annotations

import ctypes.util
from types import SimpleNamespace
from typing import Any

import pytest

from collectives.backends import mpi_tuning

# MPICH 5.0.2's description of the variable, as MPI_T_cvar_get_info returns it.
MPICH_DESCRIPTION = (
    "Variable to select iallgather algorithm\n"
    "auto - Internal algorithm selection (can be overridden with "
    "MPIR_CVAR_COLL_SELECTION_TUNING_JSON_FILE)\n"
    "sched_auto - Internal algorithm selection for sched-based algorithms\n"
    "sched_ring               - Force ring algorithm\n"
    "sched_brucks             - Force brucks algorithm\n"
    "sched_recursive_doubling - Force recursive doubling algorithm\n"
    "tsp_ring       - Force generic transport ring algorithm\n"
)


def test_enum_values_come_from_the_description_in_order() -> None:
    values = mpi_tuning._VALUE_LINE.findall(MPICH_DESCRIPTION)
    assert values == [
        "auto",
        "sched_auto",
        "sched_ring",
        "sched_brucks",
        "sched_recursive_doubling",
        "tsp_ring",
    ]
    # The value written is the line's position: what MPICH numbers its enum by.
    assert values.index(mpi_tuning.RECURSIVE_DOUBLING) == 4


class _Untouchable:
    """A world that may only be asked its size."""

    def __init__(self, size: int) -> None:
        self._size = size

    def Get_size(self) -> int:
        return self._size

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"tune() touched world.{name} for a world of {self._size}")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6, 12])
def test_small_and_odd_worlds_are_left_alone_without_any_collective(size: int) -> None:
    assert mpi_tuning.tune(SimpleNamespace(), _Untouchable(size)) == {}


def _mpi(version: str) -> SimpleNamespace:
    return SimpleNamespace(Get_library_version=lambda: version)


def test_only_mpich_and_only_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mpi_tuning.ENV, raising=False)
    monkeypatch.delenv(mpi_tuning.IALLGATHER, raising=False)
    mpich = _mpi("MPICH Version:      5.0.2\nMPICH Release date: ...")
    assert mpi_tuning._allowed(mpich)
    assert not mpi_tuning._allowed(_mpi("Open MPI v5.0.3, package: Open MPI ..."))
    assert not mpi_tuning._allowed(_mpi("Intel(R) MPI Library 2021.10 for Linux*"))
    monkeypatch.setenv(mpi_tuning.ENV, "0")
    assert not mpi_tuning._allowed(mpich)
    monkeypatch.setenv(mpi_tuning.ENV, "1")
    monkeypatch.setenv(mpi_tuning.IALLGATHER, "sched_ring")  # the user's choice wins
    assert not mpi_tuning._allowed(mpich)


def test_a_library_without_mpi_t_opens_nothing() -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    mpi = SimpleNamespace(__file__=libc, THREAD_MULTIPLE=3)
    assert mpi_tuning._CvarWriter.open(mpi, mpi_tuning.IALLGATHER) is None
