"""Scenarios for test_mpi_unit.py (run on every rank under ``mpiexec``): the one-frame fast
paths of the mpi backend, and the abort-from-another-thread check the deadline scenario shares.

Kept apart from test_mpi_unit.py, which runs them (it executes itself under ``mpiexec``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

SLACK_S = 3.0  # scheduling slack on a busy 2-core box, on top of a timeout


def abort_fails_pending(comm: Any, call: Callable[[Any], object]) -> None:
    """On rank 0, ``call`` on a fresh communicator (the other ranks never join it) fails with
    ``CommunicatorAbortedError`` soon after another thread aborts that communicator."""
    from collectives.errors import CommunicatorAbortedError
    from collectives.world import init

    other = init("mpi", timeout=60)
    if comm.rank == 0:
        timer = threading.Timer(0.3, other.abort, args=("test abort",))
        timer.start()
        start = time.monotonic()
        try:
            call(other)
        except CommunicatorAbortedError as err:
            assert "test abort" in str(err), err
            assert time.monotonic() - start < 0.3 + SLACK_S
        else:
            raise AssertionError("abort must fail the pending op")
    other.close()
    comm.barrier()


def fast_paths(comm: object) -> None:
    """allreduce and broadcast_into take the backend's one-frame path in the common case and the
    general path otherwise, with the same results, errors, ordering and sequence numbers."""
    import torch

    from collectives.communicator import Communicator
    from collectives.errors import (
        CollectiveTimeoutError,
        CommunicatorAbortedError,
        ConfigurationError,
        InvalidArgumentError,
    )
    from collectives.reduce_op import ReduceOp

    assert isinstance(comm, Communicator)
    rank, n = comm.rank, comm.size
    backend = comm.engine
    general = {"allreduce": 0, "broadcast_into": 0}
    for name in general:  # count the calls that reach the backend's general methods
        real = getattr(backend, name)

        def counting(*args: object, _real: Any = real, _name: str = name) -> None:
            general[_name] += 1
            _real(*args)

        setattr(backend, name, counting)

    def expect(allreduce: int, broadcast_into: int, what: str) -> None:
        got = (general["allreduce"], general["broadcast_into"])
        assert got == (allreduce, broadcast_into), f"{what}: general path calls {got}"

    # The common case: no general call, exact results.
    t = torch.full((1000,), float(rank + 1))
    assert comm.allreduce(t) is t and torch.equal(t, torch.full((1000,), n * (n + 1) / 2))
    m = torch.tensor([rank, -rank], dtype=torch.int64)
    comm.allreduce(m, op="max")
    assert m.tolist() == [n - 1, 0]
    d = torch.full((3,), float(rank), dtype=torch.float64)
    comm.allreduce(d, op=ReduceOp.MIN)
    assert d.tolist() == [0.0] * 3
    flags = torch.tensor([rank == 1, False])
    comm.allreduce(flags)  # booleans: "any"
    assert flags.tolist() == [True, False]
    b = torch.full((256,), float(rank))
    assert comm.broadcast_into(b, root=1) is b and torch.equal(b, torch.full((256,), 1.0))
    big = torch.full((1 << 19,), float(rank))  # 2 MiB: one Ibcast at 2 ranks, the plan at 3+
    comm.broadcast_into(big, root=n - 1)
    assert torch.equal(big, torch.full((1 << 19,), float(n - 1)))
    expect(0, 0 if n <= 2 else 1, "common case")

    # Not natively reducible, or divided afterwards: the general path, the same results.
    h = torch.full((5,), float(rank + 1), dtype=torch.bfloat16)
    comm.allreduce(h)
    assert torch.equal(h, torch.full((5,), n * (n + 1) / 2, dtype=torch.bfloat16))
    a = torch.full((4,), float(rank))
    comm.allreduce(a, op="avg")
    assert torch.equal(a, torch.full((4,), (n - 1) / 2))
    base = 1 if n > 2 else 0
    expect(2, base, "bfloat16 and avg")

    # Bad calls get the general path's errors, and no op is issued for them.
    bad: list[tuple[type[Exception], Callable[[], object]]] = [
        (InvalidArgumentError, lambda: comm.allreduce(torch.zeros(4, 4).t())),
        (InvalidArgumentError, lambda: comm.allreduce(torch.ones(3, dtype=torch.complex64).conj())),
        (ConfigurationError, lambda: comm.allreduce(torch.zeros(3), op="median")),
        (ConfigurationError, lambda: comm.allreduce(torch.zeros(3), op="band")),
        (ConfigurationError, lambda: comm.allreduce(torch.zeros(3), timeout=-1)),
        (InvalidArgumentError, lambda: comm.broadcast_into(torch.zeros(3), root=n)),
        (InvalidArgumentError, lambda: comm.broadcast_into(torch.zeros(3), root="0")),  # type: ignore[arg-type]
        (InvalidArgumentError, lambda: comm.broadcast_into(torch.zeros(4, 4).t())),
        (ConfigurationError, lambda: comm.broadcast_into(torch.zeros(3), timeout=0)),
    ]
    for error, call in bad:
        try:
            call()
        except error:
            pass
        else:
            raise AssertionError(f"expected {error.__name__}")
    after = torch.full((4,), 1.0)
    assert torch.equal(comm.allreduce(after), torch.full((4,), float(n)))

    # An async op queued first keeps its place: the blocking op behind it waits its turn.
    first, second = torch.full((64,), float(rank)), torch.full((64,), 10.0 * rank)
    work = comm.iallreduce(first)
    comm.allreduce(second)
    work.wait()
    total = n * (n - 1) / 2
    assert torch.equal(first, torch.full((64,), total))
    assert torch.equal(second, torch.full((64,), 10 * total))

    # Ranks on different paths for the same op still agree on the sequence number.
    x = torch.ones(8)
    if rank == 0:
        comm.allreduce(x)  # fast
    else:
        comm.iallreduce(x).wait()  # queued
    assert torch.equal(x, torch.full((8,), float(n)))
    assert len(set(comm.allgather(comm._lane.seq))) == 1
    assert comm.broadcast("agreed", root=0) == "agreed"

    # abort() from another thread fails a pending fast-path op promptly.
    abort_fails_pending(comm, lambda c: c.allreduce(torch.zeros(16)))

    # A timed-out fast-path op poisons the communicator, as the general path does.
    if rank == 0:
        start = time.monotonic()
        try:
            comm.allreduce(torch.zeros(16), timeout=0.5)
        except CollectiveTimeoutError as err:
            assert 0.5 <= time.monotonic() - start < 0.5 + SLACK_S
            assert "allreduce on rank 0 timed out" in str(err), err
        else:
            raise AssertionError("allreduce must time out when the others never call")
        try:
            comm.allreduce(torch.zeros(16))
        except CommunicatorAbortedError:
            pass
        else:
            raise AssertionError("a communicator must refuse ops after a timed-out allreduce")
    else:
        time.sleep(1.0)
