"""The backend conformance suite: SPMD checks every backend must pass at every world size.

Each check is a function of one ``Communicator``; every rank calls the same checks in the same
order (as in mpi4py's ``test_cco_obj``).  A check raises ``AssertionError`` (or the library's
error) when the backend misbehaves.  ``SCENARIOS`` are the destructive ones (mismatched calls,
a rank that disappears): they leave the communicator unusable, so each runs on a fresh one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from collectives.communicator import Communicator
from collectives.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    ConfigurationError,
    ConnectionLostError,
    InvalidArgumentError,
)
from collectives.testing.payloads import PAYLOADS, assert_same, payload

Check = Callable[[Communicator], None]
CHECKS: dict[str, Check] = {}
SCENARIOS: dict[str, Callable[[Communicator, float], dict[str, Any]]] = {}


def check(fn: Check) -> Check:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


# -- object API ------------------------------------------------------------------------------------
@check
def check_broadcast(comm: Communicator) -> None:
    for root in range(comm.size):
        for name in PAYLOADS:
            mine = payload(name, root) if comm.rank == root else None
            got = comm.broadcast(mine, root=root)
            assert_same(got, payload(name, root), f"broadcast({name}, root={root})")


@check
def check_scatter(comm: Communicator) -> None:
    for root in range(comm.size):
        for name in PAYLOADS:
            items = [payload(name, r) for r in range(comm.size)] if comm.rank == root else None
            got = comm.scatter(items, root=root)
            assert_same(got, payload(name, comm.rank), f"scatter({name}, root={root})")


@check
def check_gather(comm: Communicator) -> None:
    for root in range(comm.size):
        for name in PAYLOADS:
            got = comm.gather(payload(name, comm.rank), root=root)
            if comm.rank == root:
                want = [payload(name, r) for r in range(comm.size)]
                assert_same(got, want, f"gather({name}, root={root})")
            else:
                assert got is None, f"gather on non-root returned {type(got)}"


@check
def check_allgather(comm: Communicator) -> None:
    for name in PAYLOADS:
        got = comm.allgather(payload(name, comm.rank))
        assert_same(got, [payload(name, r) for r in range(comm.size)], f"allgather({name})")


@check
def check_send_recv(comm: Communicator) -> None:
    if comm.size == 1:
        try:
            comm.send(1, dst=0)
        except InvalidArgumentError:
            return
        raise AssertionError("send to self must raise InvalidArgumentError")
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    for tag, name in enumerate(PAYLOADS):
        work = comm.isend(payload(name, comm.rank), right, tag=tag)
        got = comm.recv(left, tag=tag)
        work.wait()
        assert_same(got, payload(name, left), f"recv({name}) from {left}")
    # Tags are separate channels: messages sent in one order can be received in another.
    if comm.size >= 2:
        a = comm.isend("first", right, tag=101)
        b = comm.isend("second", right, tag=102)
        assert comm.recv(left, tag=102) == "second"
        assert comm.recv(left, tag=101) == "first"
        a.wait()
        b.wait()


@check
def check_barrier(comm: Communicator) -> None:
    for _ in range(3):
        comm.barrier()
    comm.ibarrier().wait()


# -- in-place buffer API ---------------------------------------------------------------------------
_REDUCE_DTYPES = (
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.bfloat16,
    torch.float16,
)


def _ints(rank: int, dtype: torch.dtype, n: int = 10) -> torch.Tensor:
    # Small integers: every reduction order gives the same exact result, even in bf16.
    return ((torch.arange(n) * (rank + 1)) % 7 - 3).to(dtype)


def _reference(size: int, dtype: torch.dtype, op: str) -> torch.Tensor:
    blocks = [_ints(r, torch.float64) for r in range(size)]
    stack = torch.stack(blocks)
    ref = {
        "sum": stack.sum(0),
        "prod": stack.prod(0),
        "min": stack.min(0).values,
        "max": stack.max(0).values,
        "avg": stack.sum(0) / size,
    }[op]
    return ref.to(dtype)


@check
def check_allreduce(comm: Communicator) -> None:
    for dtype in _REDUCE_DTYPES:
        for op in ("sum", "prod", "min", "max", "avg"):
            if op == "avg" and not dtype.is_floating_point:
                continue
            t = _ints(comm.rank, dtype)
            out = comm.allreduce(t, op=op)
            assert out is t, "allreduce must work in place and return its tensor"
            assert_same(t, _reference(comm.size, dtype, op), f"allreduce({dtype}, {op})")
    flags = torch.tensor([comm.rank == 0, True, False])
    comm.allreduce(flags, op="sum")  # bool sum is logical or
    assert flags.tolist() == [True, True, False]
    arr = np.full(5, comm.rank + 1, dtype=np.int64)
    comm.allreduce(arr, op="max")
    assert arr.tolist() == [comm.size] * 5, "numpy arrays reduce in place too"
    f8 = _ints(comm.rank, torch.float8_e4m3fn)
    comm.allreduce(f8, op="max")
    assert_same(f8, _reference(comm.size, torch.float8_e4m3fn, "max"), "allreduce(float8, max)")
    try:
        comm.allreduce(torch.zeros(2, dtype=torch.int32), op="avg")
    except ConfigurationError:
        pass
    else:
        raise AssertionError("integer avg must be refused before any communication")


@check
def check_reduce(comm: Communicator) -> None:
    for root in range(comm.size):
        for dtype in (torch.float32, torch.int64, torch.bfloat16):
            t = _ints(comm.rank, dtype)
            got = comm.reduce(t, root=root, op="sum")
            if comm.rank == root:
                assert got is t
                assert_same(t, _reference(comm.size, dtype, "sum"), f"reduce({dtype}, root={root})")
            else:
                assert got is None


_BUFFER_DTYPES = (torch.float32, torch.bfloat16, torch.int8, torch.float8_e5m2, torch.complex64)


def _block(rank: int, dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    base = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + 100 * rank
    return (base % 120).to(dtype)


@check
def check_broadcast_into(comm: Communicator) -> None:
    for root in range(comm.size):
        for dtype in _BUFFER_DTYPES:
            buf = _block(comm.rank, dtype)
            assert comm.broadcast_into(buf, root=root) is buf
            assert_same(buf, _block(root, dtype), f"broadcast_into({dtype}, root={root})")
    big = torch.full((1 << 20,), float(comm.rank))
    comm.broadcast_into(big, root=comm.size - 1)
    assert bool((big == comm.size - 1).all())


@check
def check_gather_into(comm: Communicator) -> None:
    for root in range(comm.size):
        for dtype in _BUFFER_DTYPES:
            out = torch.zeros((comm.size, 3, 5), dtype=dtype) if comm.rank == root else None
            got = comm.gather_into(out, _block(comm.rank, dtype), root=root)
            if comm.rank == root:
                assert got is out
                want = torch.stack([_block(r, dtype) for r in range(comm.size)])
                assert_same(out, want, f"gather_into({dtype}, root={root})")
            else:
                assert got is None


def _rows(rank: int) -> int:
    """Rows rank ``rank`` sends to ``gatherv_into``: uneven, rank 1 none at all."""
    return 0 if rank == 1 else rank + 2


@check
def check_gatherv_into(comm: Communicator) -> None:
    for root in range(comm.size):
        # Rows of 5 elements, and rows of 80 KiB (big enough for the engines' direct paths).
        for dtype, width in ((torch.bfloat16, 5), (torch.float32, 20480), (torch.uint8, 7)):
            total = sum(_rows(r) for r in range(comm.size))
            mine = _block(comm.rank, dtype, (_rows(comm.rank), width))
            out = blocks = None
            if comm.rank == root:
                out = torch.full((total, width), 7, dtype=dtype)
                offsets = [sum(_rows(q) for q in range(r)) for r in range(comm.size + 1)]
                blocks = [out[offsets[r] : offsets[r + 1]] for r in range(comm.size)]
            got = comm.gatherv_into(blocks, mine, root=root)
            if comm.rank != root:
                assert got is None
                continue
            assert got is blocks and out is not None
            want = torch.cat([_block(r, dtype, (_rows(r), width)) for r in range(comm.size)])
            assert_same(out, want, f"gatherv_into({dtype}, width {width}, root={root})")


@check
def check_allgather_into(comm: Communicator) -> None:
    for dtype in _BUFFER_DTYPES:
        out = torch.zeros((comm.size * 3, 5), dtype=dtype)  # flat layout: blocks along dim 0
        comm.allgather_into(out, _block(comm.rank, dtype))
        want = torch.cat([_block(r, dtype) for r in range(comm.size)])
        assert_same(out, want, f"allgather_into({dtype})")
    arr = np.zeros((comm.size, 4), dtype=np.float32)
    comm.allgather_into(arr, np.full(4, comm.rank, dtype=np.float32))
    assert arr[:, 0].tolist() == list(range(comm.size))


@check
def check_scatter_into(comm: Communicator) -> None:
    for root in range(comm.size):
        for dtype in _BUFFER_DTYPES:
            src = (
                torch.stack([_block(r, dtype) for r in range(comm.size)])
                if comm.rank == root
                else None
            )
            out = torch.zeros((3, 5), dtype=dtype)
            assert comm.scatter_into(out, src, root=root) is out
            assert_same(out, _block(comm.rank, dtype), f"scatter_into({dtype}, root={root})")


@check
def check_send_buffer(comm: Communicator) -> None:
    if comm.size == 1:
        return check_send_recv(comm)
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    for tag, dtype in enumerate(_BUFFER_DTYPES):
        work = comm.isend_buffer(_block(comm.rank, dtype), right, tag=tag)
        out = torch.empty((3, 5), dtype=dtype)
        comm.recv_into(out, left, tag=tag)
        work.wait()
        assert_same(out, _block(left, dtype), f"recv_into({dtype})")
    return None


# -- async, arguments, timeouts --------------------------------------------------------------------
@check
def check_async_ordering(comm: Communicator) -> None:
    works = [comm.ibroadcast(payload("nested", 0) if comm.rank == 0 else None, root=0)]
    works.append(comm.iallgather(comm.rank))
    t = _ints(comm.rank, torch.float32)
    works.append(comm.iallreduce(t, op="sum"))
    # A blocking call issued while async ones are queued must run after them, not overtake them.
    last = comm.allgather(-comm.rank)
    assert last == [-r for r in range(comm.size)]
    assert_same(works[0].wait(timeout=60), payload("nested", 0), "ibroadcast")
    assert works[1].wait(timeout=60) == list(range(comm.size))
    works[2].wait(timeout=60)
    assert_same(t, _reference(comm.size, torch.float32, "sum"), "iallreduce")
    assert all(w.is_completed() and w.exception() is None for w in works)


@check
def check_bad_arguments(comm: Communicator) -> None:
    for bad in (-1, comm.size, "0"):
        try:
            comm.broadcast(1, root=bad)  # type: ignore[arg-type]
        except InvalidArgumentError:
            continue
        raise AssertionError(f"root={bad!r} must raise InvalidArgumentError")
    for timeout in (0, -1.0, math.inf, math.nan):
        try:
            comm.barrier(timeout=timeout)
        except ConfigurationError:
            continue
        raise AssertionError(f"timeout={timeout!r} must raise ConfigurationError")
    if comm.size > 1:
        try:
            comm.allgather_into(torch.zeros(3), torch.zeros(2))
        except InvalidArgumentError:
            pass
        else:
            raise AssertionError("a recv buffer of the wrong size must be refused")
    comm.barrier()  # still usable: argument errors happen before any communication


@check
def check_short_timeout_ok(comm: Communicator) -> None:
    # A generous per-call timeout on a healthy world never fires.
    for _ in range(3):
        assert comm.allgather(comm.rank, timeout=30.0) == list(range(comm.size))


# -- destructive scenarios (fresh communicator each) -----------------------------------------------
def scenario(
    fn: Callable[[Communicator, float], dict[str, Any]],
) -> Callable[[Communicator, float], dict[str, Any]]:
    SCENARIOS[fn.__name__.removeprefix("scenario_")] = fn
    return fn


def _attempt(fn: Callable[[], object]) -> str | None:
    try:
        fn()
    except (CollectiveMismatchError, CollectiveTimeoutError, ConnectionLostError) as err:
        return type(err).__name__ + ": " + str(err)
    return None


@scenario
def scenario_mismatch(comm: Communicator, timeout: float) -> dict[str, Any]:
    """Rank 0 broadcasts while the others allgather; then everyone calls a barrier."""
    start = time.monotonic()
    if comm.rank == 0:
        first = _attempt(lambda: comm.broadcast("x", root=0, timeout=timeout))
    else:
        first = _attempt(lambda: comm.allgather("y", timeout=timeout))
    second = None if first else _attempt(lambda: comm.barrier(timeout=timeout))
    return {"error": first or second, "elapsed": time.monotonic() - start}


@scenario
def scenario_gatherv_mismatch(comm: Communicator, timeout: float) -> dict[str, Any]:
    """The root's block for rank 1 is one row short: the root names rank 1, nobody aborts."""
    start = time.monotonic()
    mine = torch.full((3, 4096), float(comm.rank))
    blocks = None
    if comm.rank == 0:
        blocks = [torch.empty(2 if r == 1 else 3, 4096) for r in range(comm.size)]
    error = _attempt(lambda: comm.gatherv_into(blocks, mine, root=0, timeout=timeout))
    return {"error": error, "elapsed": time.monotonic() - start}


@scenario
def scenario_rank_silent(comm: Communicator, timeout: float) -> dict[str, Any]:
    """The last rank never joins an allgather: the others time out naming it."""
    start = time.monotonic()
    if comm.rank == comm.size - 1:
        time.sleep(timeout * 1.5)
        return {"error": None, "elapsed": time.monotonic() - start, "silent": True}
    error = _attempt(lambda: comm.allgather(comm.rank, timeout=timeout))
    return {"error": error, "elapsed": time.monotonic() - start}


@scenario
def scenario_rank_exit(comm: Communicator, timeout: float) -> dict[str, Any]:
    """The last rank's process exits in the middle of the job (not on the in-process backend).

    It leaves after a barrier, so every rank has joined the world first: a rank that exits
    while another still forms it is another scenario (that one fails in ``init``, and under a
    launcher it is stopped before it could report)."""
    start = time.monotonic()
    if comm.rank == comm.size - 1:
        comm.barrier(timeout=timeout)
        os._exit(17)

    def job() -> None:
        comm.barrier(timeout=timeout)
        comm.allgather(comm.rank, timeout=timeout)

    error = _attempt(job)
    return {"error": error, "elapsed": time.monotonic() - start}
