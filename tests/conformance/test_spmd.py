"""``run_spmd``: one SPMD function on any registered backend (threads or processes)."""

from __future__ import annotations

import pytest

from collectives.communicator import Communicator
from collectives.errors import InvalidArgumentError
from collectives.testing import CHECKS, run_spmd


def ranks_and_sum(comm: Communicator) -> list[int]:
    import torch

    t = torch.full((3,), float(comm.rank + 1))
    comm.allreduce(t)
    return [comm.rank, comm.size, int(t[0])]


def test_local_runs_in_threads() -> None:
    assert run_spmd("local", 3, ranks_and_sum) == [[r, 3, 6] for r in range(3)]
    run_spmd("local", 2, CHECKS["broadcast"])


def test_process_worlds_need_an_importable_function() -> None:
    with pytest.raises(InvalidArgumentError, match="module-level"):
        run_spmd("gloo", 2, lambda comm: comm.rank)


@pytest.mark.gloo
def test_gloo_runs_in_processes() -> None:
    assert run_spmd("gloo", 2, ranks_and_sum, timeout=120) == [[0, 2, 3], [1, 2, 3]]
    run_spmd("gloo", 2, CHECKS["barrier"], timeout=120)
