"""collective.run_now: a blocking step on the caller's thread reports failures as collective.run
does, and an interrupt that aborted it surfaces as an interrupt."""

from __future__ import annotations

from typing import Any

import pytest

from collectives import Communicator, CommunicatorAbortedError, InvalidArgumentError
from collectives.testing import run_local
from comfy_nodes import cluster, collective


class _Runtime(cluster.Runtime):
    """Records what run_now reports (the integration would re-form the cluster)."""

    def __init__(self, interrupted: bool = False) -> None:
        super().__init__()
        self.reported: list[BaseException] = []
        self._pressed = interrupted

    def failed(self, comm: Communicator, err: BaseException) -> None:
        self.reported.append(err)

    def interrupted(self) -> bool:
        return self._pressed


def _one_rank(body: Any) -> Any:
    return run_local(1, body)[0]


def test_a_failed_step_is_reported_and_raised() -> None:
    rt = _Runtime()

    def body(comm: Communicator) -> str:
        def call() -> None:
            raise CommunicatorAbortedError("aborted by rank 2")

        with cluster.installed(rt), pytest.raises(CommunicatorAbortedError):
            collective.run_now(comm, call)
        return "ok"

    assert _one_rank(body) == "ok"
    assert [type(e) for e in rt.reported] == [CommunicatorAbortedError]


def test_a_misuse_is_raised_but_not_reported_and_a_result_comes_back() -> None:
    rt = _Runtime()

    def body(comm: Communicator) -> int:
        def bad() -> None:
            raise InvalidArgumentError("wrong buffer")

        with cluster.installed(rt):
            with pytest.raises(InvalidArgumentError):
                collective.run_now(comm, bad)
            return int(collective.run_now(comm, lambda: 7))

    assert _one_rank(body) == 7
    assert rt.reported == []


def test_a_step_aborted_by_this_ranks_interrupt_raises_the_interrupt() -> None:
    rt = _Runtime(interrupted=True)

    def body(comm: Communicator) -> str:
        def call() -> None:
            raise CommunicatorAbortedError("interrupted on rank 0")

        with cluster.installed(rt), pytest.raises(cluster.ClusterInterrupted):
            collective.run_now(comm, call)
        return "ok"

    assert _one_rank(body) == "ok"
    assert rt.reported == []  # the interrupt, not a failure of the world
