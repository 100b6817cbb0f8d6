"""Wrong results the collectives core once gave, each pinned on the local backend (3 ranks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from collectives.errors import (
    CodecError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    ConfigurationError,
    ConnectionLostError,
    InvalidArgumentError,
)
from collectives.testing import run_local
from collectives.work import ElasticPool

TYPED = (CollectiveMismatchError, CollectiveTimeoutError, ConnectionLostError)


# -- ranks that disagree on the root ---------------------------------------------------------------
def _t(rank: int) -> torch.Tensor:
    return torch.full((4,), float(rank))


ROOTED: dict[str, Callable[[Any, int], object]] = {
    "broadcast": lambda c, root: c.broadcast(f"from {c.rank}", root=root),
    "scatter": lambda c, root: c.scatter(list(range(c.size)) if c.rank == root else None, root),
    "gather": lambda c, root: c.gather(c.rank, root=root),
    "reduce": lambda c, root: c.reduce(_t(c.rank), root=root),
    "broadcast_into": lambda c, root: c.broadcast_into(_t(c.rank), root=root),
    "scatter_into": lambda c, root: c.scatter_into(
        torch.zeros(4), torch.zeros(c.size, 4) if c.rank == root else None, root
    ),
    "gather_into": lambda c, root: c.gather_into(
        torch.zeros(c.size, 4) if c.rank == root else None, _t(c.rank), root
    ),
}


@pytest.mark.parametrize("op", sorted(ROOTED))
def test_disagreeing_roots_fail_on_every_rank(op: str) -> None:
    """Rank 0 says root 0, ranks 1 and 2 say root 1: no rank may return data."""

    def fn(comm: Any) -> str:
        root = 0 if comm.rank == 0 else 1
        try:
            ROOTED[op](comm, root)
        except TYPED as err:
            comm.abort(f"{type(err).__name__}")  # the others learn at once, not at the deadline
            return type(err).__name__
        return "returned data"

    results = run_local(3, fn, op_timeout=1.0, close=False)
    # Some shapes deadlock before any rank sees the other root (a gather whose two roots each
    # wait for the other): then every rank times out, which is typed too.
    assert set(results) <= {cls.__name__ for cls in TYPED}, results


def test_agreeing_roots_still_work_after_many_rooted_ops() -> None:
    def fn(comm: Any) -> list[object]:
        return [comm.broadcast(comm.rank, root=r) for r in range(comm.size)]

    assert run_local(3, fn) == [[0, 1, 2]] * 3


# -- a caller error consumes no sequence number ---------------------------------------------------
BAD_CALLS: dict[str, Callable[[Any], object]] = {
    "barrier timeout": lambda c: c.barrier(timeout=-1),
    "ibarrier timeout": lambda c: c.ibarrier(timeout=0),
    "allgather timeout": lambda c: c.allgather(1, timeout=float("nan")),
    "allreduce timeout": lambda c: c.allreduce(torch.ones(2), timeout=-1),
    "iallreduce timeout": lambda c: c.iallreduce(torch.ones(2), timeout=-1),
    "broadcast_into timeout": lambda c: c.broadcast_into(torch.ones(2), timeout=-1),
    "broadcast root": lambda c: c.broadcast(1, root=7),
    "reduce root": lambda c: c.reduce(torch.ones(2), root=-1),
    "allgather_into buffer": lambda c: c.allgather_into(torch.zeros(3), torch.zeros(2)),
    "gather_into buffer": lambda c: c.gather_into(torch.zeros(1), torch.zeros(2), root=c.rank),
    "scatter items": lambda c: c.scatter([1], root=c.rank),
    "unencodable object": lambda c: c.broadcast({1, 2}, root=c.rank),
}


@pytest.mark.parametrize("bad", sorted(BAD_CALLS))
def test_a_refused_call_leaves_the_sequence_in_step(bad: str) -> None:
    def fn(comm: Any) -> object:
        if comm.rank == 1:
            with pytest.raises((ConfigurationError, InvalidArgumentError, CodecError)):
                BAD_CALLS[bad](comm)
        got = comm.allgather(comm.rank)
        comm.barrier()
        return got

    assert run_local(3, fn, op_timeout=5.0) == [[0, 1, 2]] * 3


# -- asynchronous point to point has no thread limit ----------------------------------------------
def test_hundred_pending_irecvs_do_not_starve_an_isend() -> None:
    def fn(comm: Any) -> object:
        if comm.rank == 0:
            works = [comm.irecv(1, tag=t) for t in range(100)]
            comm.isend("go", 1, tag=500).wait()
            return [w.wait() for w in works]
        assert comm.recv(0, tag=500) == "go"
        for t in range(100):
            comm.send(t, 0, tag=t)
        return None

    assert run_local(2, fn, op_timeout=10.0)[0] == list(range(100))


def test_elastic_pool_grows_then_idle_threads_exit() -> None:
    import threading

    pool = ElasticPool("test-pool", idle_s=0.05)
    gate = threading.Event()
    done: list[int] = []
    for i in range(50):  # all block until the last job opens the gate
        pool.submit(lambda i=i: (gate.wait(5), done.append(i)))
    pool.submit(gate.set)
    deadline = time.monotonic() + 5
    while len(done) < 50 or pool.idle_threads():
        assert time.monotonic() < deadline, (len(done), pool.idle_threads())
        time.sleep(0.01)
    pool.submit(lambda: done.append(-1))  # a new burst starts fresh threads
    while -1 not in done:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
