"""Small collectives of a one-host udp world through its arena (collectives.backends.udp_arena):
every op bit-exact against the message path, the fallbacks for payloads that do not fit,
mismatched ops, a rank that never comes, and the arena real processes set up.

Thread worlds (one process) never pass the same-host probe, so the thread tests give their
ranks an arena by hand: one mapping, each rank's view of it."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from collectives.backends import cma, shm_arena, shm_ring
from collectives.backends.p2p import P2PBackend
from collectives.backends.shm_arena import Arena
from collectives.communicator import Communicator
from collectives.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CommunicatorAbortedError,
)
from tests.backends.test_udp_driver import keyed
from tests.backends.udp_worlds import launched_world, run_world

pytestmark = pytest.mark.skipif(
    not (shm_ring.available() and cma.enabled()), reason="arenas need Linux on x86-64"
)


def _arena_world(n: int) -> Any:
    """What each thread rank calls first: its view of one fresh arena, then a barrier (on the
    message path: the arena is not set yet on every rank)."""
    fd, area = shm_arena.create(n)
    mappings = [area] + [shm_arena.attach(os.getpid(), fd, n) for _ in range(1, n)]
    os.close(fd)
    ready = threading.Barrier(n)

    def start(comm: Communicator) -> None:
        backend = comm.engine  # type: ignore[attr-defined]
        ready.wait(10)
        backend._arena = backend._engine.arena = Arena(mappings[comm.rank], comm.rank, n)
        ready.wait(10)  # every rank has it before any takes the next op through it

    return start


def _both_paths(
    start: Callable[[Communicator], None], ops: Callable[[Communicator], list[Any]]
) -> Callable[[Communicator], Any]:
    """A rank's body that runs ``ops`` on the message path, then gives the rank its arena
    (``start``) and runs them again: (message path's results, arena's, arena ops used)."""

    def fn(comm: Communicator) -> Any:
        plain = ops(comm)  # the message path
        start(comm)
        before = comm.stats()["arena_ops"]
        fast = ops(comm)
        return plain, fast, comm.stats()["arena_ops"] - before

    return fn


def test_every_small_collective_matches_the_message_path() -> None:
    start = _arena_world(3)

    def ops(comm: Communicator) -> list[Any]:
        r, n = comm.rank, comm.size
        gen = torch.Generator().manual_seed(r)
        x = torch.randn(300, generator=gen)
        out: list[Any] = [comm.broadcast({"r": r, "x": [1, 2]}, root=1)]
        out.append(comm.allgather((r, "s" * r)))
        out.append(comm.gather(r * 3, root=2))
        t = x.clone()
        comm.allreduce(t)
        out.append(t)
        t = x.to(torch.bfloat16)
        comm.allreduce(t, op="max")
        out.append(t)
        t = torch.arange(10, dtype=torch.int64) + r
        comm.reduce(t, root=0, op="prod")
        out.append(t)
        b = torch.full((7,), float(r)) if r == 2 else torch.zeros(7)
        comm.broadcast_into(b, root=2)
        out.append(b)
        g = torch.empty(n * 5, dtype=torch.int32)
        comm.allgather_into(g, torch.full((5,), r, dtype=torch.int32))
        out.append(g)
        g2 = torch.empty(n * 2) if r == 0 else None
        comm.gather_into(g2, torch.full((2,), r + 0.5), root=0)
        out.append(g2)
        s = torch.empty(4, dtype=torch.float16)
        src = torch.arange(n * 4, dtype=torch.float16) if r == 1 else None
        comm.scatter_into(s, src, root=1)
        out.append(s)
        comm.barrier()
        return out

    results = run_world(3, keyed(3), _both_paths(start, ops))
    for rank, (plain, fast, used) in enumerate(results):
        assert used == len(fast) + 1, rank  # every op of the second round (and the barrier)
        for a, b in zip(plain, fast, strict=True):
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b), (rank, a, b)
            else:
                assert a == b, (rank, a, b)
    # The allreduce gives every rank the same bits (the ranks' tensors added in rank order).
    assert all(torch.equal(results[0][1][3], res[1][3]) for res in results)


_REDUCTIONS: list[tuple[torch.dtype, tuple[str, ...]]] = [
    (torch.float32, ("sum", "avg", "prod", "min", "max")),
    (torch.float16, ("sum", "avg", "max")),
    (torch.bfloat16, ("sum", "prod", "min")),
    (torch.float8_e4m3fn, ("sum", "max")),  # no kernels: the general path
    (torch.int32, ("sum", "prod", "band", "bor", "bxor")),
    (torch.uint8, ("sum", "max")),
    (torch.uint16, ("sum", "min")),  # no kernels: the general path
    (torch.bool, ("sum", "prod")),
    (torch.complex64, ("sum", "prod")),
]


def test_reductions_of_every_dtype_and_op_match_the_message_path() -> None:
    # 5 ranks: recursive doubling with a remainder, three steps through scratch.  Each op runs
    # twice: the second reads the peers' tensors through the views kept after the first.
    start = _arena_world(5)

    def ops(comm: Communicator) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(comm.rank)
        out = []
        for dtype, names in _REDUCTIONS:
            for op in names:
                for root in (None, 3, None):
                    x = torch.randn(24, generator=gen) * 3
                    if dtype.is_complex:
                        t = torch.complex(x, x.flip(0)).to(dtype)
                    elif dtype == torch.bool:
                        t = x > 0
                    elif dtype.is_floating_point:
                        t = x.to(dtype)
                    else:
                        t = (x.abs().to(torch.int64) + 1).to(dtype)
                    if root is None:
                        comm.allreduce(t, op=op)
                    else:
                        comm.reduce(t, root=root, op=op)
                    out.append(t)
        return out

    results = run_world(5, keyed(5), _both_paths(start, ops))
    for rank, (plain, fast, used) in enumerate(results):
        assert used == len(fast), rank
        for index, (a, b) in enumerate(zip(plain, fast, strict=True)):
            same = a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            assert same, (rank, index, a, b)


def test_a_large_allreduce_of_a_one_host_world_goes_up_the_tree_and_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 ranks, 1 MiB: past the arena, where the message path would take the ring.  Every rank
    # ends with the same bits, the sum (and the mean) computed here, by the tree's two ops.
    start = _arena_world(3)
    trees: list[str] = []
    reduce = P2PBackend.reduce

    def counted(self: Any, tensor: torch.Tensor, root: int, op: Any, ctx: Any) -> None:
        trees.append(ctx.name)
        reduce(self, tensor, root, op, ctx)

    monkeypatch.setattr(P2PBackend, "reduce", counted)

    def parts(rank: int) -> torch.Tensor:
        return torch.randn(1 << 18, generator=torch.Generator().manual_seed(rank))

    def fn(comm: Communicator) -> Any:
        start(comm)
        total, mean = parts(comm.rank), parts(comm.rank)
        comm.allreduce(total)
        comm.allreduce(mean, op="avg")
        return total, mean

    results = run_world(3, keyed(3), fn)
    assert trees == ["allreduce/up"] * 6  # every rank, both ops
    for total, mean in results:
        assert torch.equal(total, results[0][0]) and torch.equal(mean, results[0][1])
    expected = parts(0) + parts(1) + parts(2)
    assert torch.allclose(results[0][0], expected, atol=1e-5)
    assert torch.allclose(results[0][1], expected / 3, atol=1e-5)


def test_scatters_through_the_arena_take_the_right_block_of_every_dtype() -> None:
    # The second scatter of a dtype copies through the cached header; an int32 scatter of the
    # same byte size after a float32 one must not be taken for it.
    start = _arena_world(3)

    def fn(comm: Communicator) -> Any:
        start(comm)
        got = []
        for dtype in (torch.float32, torch.float32, torch.int32, torch.int32, torch.bfloat16):
            src = torch.arange(3 * 8).to(dtype).view(3, 8) + 1 if comm.rank == 2 else None
            out = torch.zeros(8, dtype=dtype)
            comm.scatter_into(out, src, root=2)
            got.append(out)
        return got, comm.stats()["arena_ops"]

    for rank, (got, used) in enumerate(run_world(3, keyed(3), fn)):
        assert used >= 5
        for out in got:
            want = (torch.arange(3 * 8).view(3, 8)[rank] + 1).to(out.dtype)
            assert out.dtype == want.dtype and torch.equal(out, want), (rank, out)


def test_allgathers_through_the_arena_fill_every_block_in_place_or_not() -> None:
    # The arena copies through byte views kept by address: the same buffers again (views
    # reused), a sendbuf that is this rank's own block of recvbuf (a copy onto itself), and an
    # int16 gather of the same byte size after a bfloat16 one (a header not taken for another).
    start = _arena_world(3)

    def fn(comm: Communicator) -> Any:
        start(comm)
        r, got = comm.rank, []
        out = torch.zeros(3, 2, 4, dtype=torch.bfloat16)
        for _ in range(2):
            out.zero_()
            comm.allgather_into(out, torch.full((2, 4), r + 0.5, dtype=torch.bfloat16))
            got.append(out.clone())
        for dtype in (torch.int16, torch.float64):
            shared = torch.zeros(3 * 5, dtype=dtype)
            mine = shared[5 * r : 5 * (r + 1)]
            mine.copy_(torch.arange(5) * 10 + r)
            comm.allgather_into(shared, mine)  # in place
            got.append(shared)
        return got, comm.stats()["arena_ops"]

    for rank, (got, used) in enumerate(run_world(3, keyed(3), fn)):
        assert used >= 4, rank
        for out in got[:2]:
            want = torch.stack(
                [torch.full((2, 4), q + 0.5, dtype=torch.bfloat16) for q in range(3)]
            )
            assert torch.equal(out, want), (rank, out)
        for out in got[2:]:
            want = torch.cat([torch.arange(5) * 10 + q for q in range(3)]).to(out.dtype)
            assert torch.equal(out, want), (rank, out)


def test_payloads_that_do_not_fit_take_the_message_path_on_every_rank() -> None:
    start = _arena_world(3)
    big = bytes(range(256)) * 1024  # 256 KB: more than a slot

    def fn(comm: Communicator) -> Any:
        start(comm)
        got = [comm.broadcast(big if comm.rank == 0 else None, root=0)]
        got.append(comm.allgather(big if comm.rank == 1 else b"small"))
        got.append(comm.gather(big if comm.rank == 2 else comm.rank, root=0))
        t = torch.ones(100_000)  # 400 KB: every rank knows it does not fit
        comm.allreduce(t)
        got.append(bool((t == 3).all()))
        got.append(comm.broadcast("after", root=2))  # the arena again
        return got, comm.stats()["arena_ops"]

    results = run_world(3, keyed(3), fn)
    for rank, (got, arena_ops) in enumerate(results):
        assert got[0] == big
        assert got[1] == [b"small", big, b"small"]
        assert got[2] == ([0, 1, big] if rank == 0 else None)
        assert got[3] is True and got[4] == "after"
        assert arena_ops == 4  # three exchanges that fell back, then the last broadcast


def test_ranks_that_call_different_ops_all_get_a_mismatch() -> None:
    start = _arena_world(3)

    def fn(comm: Communicator) -> Any:
        start(comm)
        with pytest.raises(CollectiveMismatchError):
            comm.broadcast("x", root=comm.rank % 2)  # rank 1 names another root
        return True

    assert run_world(3, keyed(3), fn) == [True] * 3


def _with_rank_1_away(body: Callable[[Communicator], Any]) -> Any:
    """``body(comm)`` on rank 0 of a 2-rank arena world whose rank 1 is alive and heartbeating
    but never calls a collective; what it returned."""
    start = _arena_world(2)
    done = threading.Event()

    def fn(comm: Communicator) -> Any:
        start(comm)
        if comm.rank == 1:
            done.wait(20)
            return None
        try:
            return body(comm)
        finally:
            done.set()

    return run_world(2, keyed(2), fn)[0]


def test_a_rank_that_never_comes_is_named_in_the_timeout() -> None:
    def body(comm: Communicator) -> Any:
        with pytest.raises(CollectiveTimeoutError) as info:
            comm.barrier(timeout=1.0)
        return info.value.ranks

    assert _with_rank_1_away(body) == (1,)


def test_an_abort_ends_a_wait_in_the_arena_within_a_few_milliseconds() -> None:
    # Rank 0 sleeps on the arena's world word for a rank that never comes; an abort from
    # another thread ends the wait at the next slice, long before the op's timeout.
    def body(comm: Communicator) -> float:
        timer = threading.Timer(0.3, comm.abort, args=("stopped by the test",))
        timer.start()
        began = time.monotonic()
        try:
            with pytest.raises(CommunicatorAbortedError, match="stopped by the test"):
                comm.barrier(timeout=15.0)
        finally:
            timer.cancel()
        return time.monotonic() - began

    took = _with_rank_1_away(body)
    assert 0.25 < took < 5.0, took


_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    import collectives
    comm = collectives.init(timeout=60)
    r, n = comm.rank, comm.size
    got = comm.broadcast({"from": 0} if r == 0 else None, root=0)
    assert got == {"from": 0}, got
    t = torch.full((256,), float(r))
    comm.allreduce(t)
    assert bool((t == sum(range(n))).all())
    assert comm.allgather(r) == list(range(n))
    comm.barrier()
    stats = comm.stats()
    with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
        json.dump(dict(arena=stats["arena"], ops=stats["arena_ops"]), f)
    comm.close()
    """
)


def _processes(tmp_path: Path, env: dict[str, str], n: int = 3) -> dict[int, dict[str, Any]]:
    return launched_world(tmp_path, _SCRIPT, env, n)


def test_processes_of_one_host_share_an_arena(tmp_path: Path) -> None:
    for rep in _processes(tmp_path, {}, 4).values():
        assert rep == {"arena": True, "ops": 4}


def test_without_rings_there_is_no_arena(tmp_path: Path) -> None:
    for rep in _processes(tmp_path, {shm_ring.ENV: "0"}, 3).values():
        assert rep == {"arena": False, "ops": 0}
