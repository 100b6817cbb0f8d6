"""The communicator's side of backend fast paths (FastLane): when one may run, what it shares.

The fast paths themselves are MPI's (tested under mpiexec in tests/backends/test_mpi_unit.py);
here a recording fast path on the in-process backend checks the communicator's bookkeeping.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable

import pytest
import torch

from collectives.backends.base import BackendConfig, FastLane, FastOp
from collectives.backends.local import LocalBackend
from collectives.communicator import Communicator
from collectives.errors import (
    CollectiveTimeoutError,
    CommunicatorAbortedError,
    InvalidArgumentError,
)
from collectives.options import CommOptions

Seen = list[tuple[str, bool, int]]


def _communicator(
    behaviour: Callable[[FastLane], bool], seen: Seen, timeout: float = 30.0
) -> Communicator:
    """A world of one whose fast paths record (op, lane open?, seq) and then do ``behaviour``."""
    backend = LocalBackend.create(BackendConfig(rank=0, size=1, world=uuid.uuid4().hex))

    def fast_path(op: str, lane: FastLane) -> FastOp:
        def run(tensor: object, arg: object, timeout: float | None) -> bool:
            seen.append((op, lane.open, lane.seq))
            return behaviour(lane)

        return run

    backend.fast_path = fast_path  # type: ignore[method-assign]
    return Communicator(backend, CommOptions(timeout=timeout))


def _declines(lane: FastLane) -> bool:
    return False


def _runs(lane: FastLane) -> bool:
    with lane.lock:
        lane.seq += 1
    return True


def test_both_ops_consult_their_fast_path_and_fall_back_when_it_declines() -> None:
    seen: Seen = []
    comm = _communicator(_declines, seen)
    t = torch.arange(4.0)
    assert comm.allreduce(t) is t and torch.equal(t, torch.arange(4.0))
    assert comm.broadcast_into(t) is t
    assert seen == [("allreduce", True, 0), ("broadcast_into", True, 1)]
    assert comm._lane.seq == 2  # the general path took the numbers
    comm.close()


def test_a_fast_path_that_runs_replaces_the_general_path_and_shares_the_sequence() -> None:
    seen: Seen = []
    comm = _communicator(_runs, seen)
    comm.allreduce(torch.zeros(3))
    comm.broadcast_into(torch.zeros(3))
    comm.barrier()  # general: takes the next number after the fast ones
    assert [s[2] for s in seen] == [0, 1]
    assert comm._lane.seq == 3
    comm.close()


def test_lane_is_closed_while_an_async_op_is_queued() -> None:
    seen: Seen = []
    comm = _communicator(_declines, seen)
    release = threading.Event()
    # Hold the worker busy with a queued op that waits on the event.
    blocker = comm._later("allreduce", None, lambda *a: release.wait(10), (), None)
    assert comm._lane.open is False
    done = threading.Event()

    def blocking_call() -> None:
        comm.allreduce(torch.zeros(2))
        done.set()

    caller = threading.Thread(target=blocking_call)
    caller.start()
    assert not done.wait(0.2), "the blocking op must wait behind the queued one"
    release.set()
    blocker.wait(10)
    assert done.wait(10)
    caller.join(10)
    assert seen[0][1] is False  # the fast path saw a closed lane (and declined)
    assert comm._lane.open is True  # nothing queued any more
    comm.close()


def test_lane_closes_on_abort_close_and_fatal_errors_only() -> None:
    seen: Seen = []
    comm = _communicator(_declines, seen)
    assert comm._lane.open
    comm.abort("test")
    assert not comm._lane.open
    comm.close()
    other = _communicator(_declines, seen)
    other.close()
    assert not other._lane.open


def test_fatal_error_from_a_fast_path_poisons_and_other_errors_do_not() -> None:
    errors: list[BaseException] = [InvalidArgumentError("bad call"), CollectiveTimeoutError("late")]

    def raises(lane: FastLane) -> bool:
        raise errors.pop(0)

    comm = _communicator(raises, [])
    with pytest.raises(InvalidArgumentError):
        comm.allreduce(torch.zeros(2))
    assert comm._lane.open  # a refused argument changes nothing
    with pytest.raises(CollectiveTimeoutError):
        comm.broadcast_into(torch.zeros(2))
    assert not comm._lane.open
    with pytest.raises(CommunicatorAbortedError, match="earlier failure"):
        comm.barrier()
    comm.close()


def test_new_options_reach_the_lane() -> None:
    comm = _communicator(_declines, [], timeout=12.0)
    assert comm._lane.timeout == 12.0
    comm.options = CommOptions(timeout=3.5)
    assert comm._lane.timeout == 3.5 and comm.options.timeout == 3.5
    comm.close()


def test_lane_stays_closed_after_an_abort_with_an_empty_reason_once_the_queue_drains() -> None:
    seen: Seen = []
    comm = _communicator(_declines, seen)
    release = threading.Event()
    blocker = comm._later("allreduce", None, lambda *a: release.wait(10), (), None)
    comm.abort("")
    release.set()
    # The queued op fails or finishes depending on whether it had started before the abort;
    # either way the queue drains, and the lane must stay closed.
    with contextlib.suppress(CommunicatorAbortedError):
        blocker.wait(10)
    assert not comm._lane.open
    comm.close()
