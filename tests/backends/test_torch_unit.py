"""Unit tests of the gloo backend: this file is also the script each rank runs.

    comfycluster-launch --nproc 3 -- python tests/backends/test_torch_unit.py main

The pytest side starts the ranks as real processes (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as
any launcher would) and checks that every rank printed ``rank R SCENARIO ok``.  The conformance
suite (``python -m collectives.testing.runner``) covers every op x root x payload; these cover
what is specific to this backend: the dtype table (gloo-native, uint8 views and the shared
algorithms, bit-identical on every rank), envelopes longer than their inline room, the point to
point gather path, resumed receives, mismatched calls, deadlines, abort, a rank that dies
mid-op, same-host reads, and building on a process group the user already created.  The tests
that form no world (rendezvous errors, envelope layout) are in test_torch_inprocess.py.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0  # per-op timeout of the deadline scenarios
SLACK_S = 3.0


# -- pytest side -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def _world(n: int, plan: str) -> tuple[list[int], str]:
    """Run this file as ``n`` ranks with ``plan``; every rank's exit code and all output."""
    importlib.import_module("torch.distributed")  # installed by setup.sh: fail if absent
    port = _free_port()
    procs = []
    for rank in range(n):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=str(ROOT),
            OMP_NUM_THREADS="1",
        )
        env.pop("COMFY_CLUSTER_BACKEND", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, plan],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs, codes = [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += "\n[killed: the rank hung]"
        logs.append(out)
        codes.append(proc.returncode)
    return codes, "\n".join(f"--- rank {r} ---\n{log}" for r, log in enumerate(logs))


# Scenarios of the "main" plan that every rank of a 3-rank world passes.
THREE_RANKS = [
    "dtypes",
    "fast_path",
    "random_identical",
    "views",
    "objects",
    "resume",
    "existing_group",
    "mismatch",
]


def _check(n: int, plan: str, scenario: str, ranks: list[int] | None = None) -> None:
    codes, log = _world(n, plan)
    for rank in range(n) if ranks is None else ranks:
        assert f"rank {rank} {scenario} ok" in log, f"exit codes {codes}\n{log[-8000:]}"


@pytest.mark.gloo
@pytest.mark.parametrize("scenario", THREE_RANKS)
def test_three_ranks(scenario: str) -> None:
    _check(3, "main", scenario)


@pytest.mark.gloo
def test_deadline_names_the_silent_rank() -> None:
    _check(3, "main", "deadline", ranks=[0, 1])


@pytest.mark.gloo
def test_abort_unblocks_collective_and_point_to_point() -> None:
    _check(3, "main", "abort", ranks=[2])


@pytest.mark.gloo
@pytest.mark.parametrize("plan", ["cma", "cma_off_1"])
def test_large_buffers_are_read_across_processes_unless_a_rank_opts_out(plan: str) -> None:
    _check(3, plan, "cma")


@pytest.mark.gloo
def test_rank_exiting_mid_op() -> None:
    codes, log = _world(3, "exit")
    _check(3, "exit", "exit", ranks=[0, 1])
    assert codes[2] == 17, log


# -- rank side -------------------------------------------------------------------------------------
Scenario = Callable[[Any, Any], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__.removeprefix("s_")] = fn
    return fn


def _ints(rank: int, dtype: Any, n: int = 12) -> Any:
    """Small integers (-2..2): every reduction order gives the same exact result."""
    import torch

    base = (torch.arange(n) * (rank + 2) + rank) % 5 - 2
    if dtype == torch.bool:
        return base > 0
    if dtype.is_complex:
        return torch.complex(base.float(), (base.flip(0) % 2).float()).to(dtype)
    return base.to(dtype)


def _reference(size: int, dtype: Any, op: Any) -> Any:
    from collectives.reduce_op import combine_, finish_

    acc = _ints(0, dtype).clone()
    for r in range(1, size):
        combine_(acc, _ints(r, dtype), op)
    finish_(acc, op, size)
    return acc


def _same_bytes(a: Any, b: Any) -> bool:
    import torch

    flat = [x.contiguous().reshape(-1).view(torch.uint8) for x in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat[0], flat[1])


def _same_values(a: Any, b: Any) -> bool:
    """Equal values (0.0 == -0.0: a product's sign of zero depends on the reduction order)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_complex():
        return torch.equal(torch.view_as_real(a), torch.view_as_real(b))
    if a.is_floating_point():
        return torch.equal(a.float(), b.float())
    return torch.equal(a, b)


def _identical_everywhere(comm: Any, t: Any) -> bool:
    import torch

    mine = bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return all(other == mine for other in comm.allgather(mine))


@scenario
def s_dtypes(comm: Any, ctx: Any) -> None:
    import torch

    from collectives.reduce_op import ReduceOp

    table = {
        torch.bfloat16: ["sum", "avg", "prod", "min", "max"],
        torch.float16: ["sum", "avg", "max"],
        torch.float32: ["sum", "avg"],
        torch.float8_e4m3fn: ["sum", "avg", "prod", "min", "max"],  # gloo rejects: fallback
        torch.float8_e5m2: ["sum", "max"],
        torch.int16: ["sum", "max", "band", "bxor"],  # gloo rejects: fallback
        torch.uint16: ["prod", "bor"],  # torch has no uint16 add/min/max kernels (combine_)
        torch.int8: ["sum", "min", "band"],
        torch.int64: ["prod", "bor"],
        torch.bool: ["sum", "prod", "min", "max", "band", "bor", "bxor"],  # as uint8
        torch.complex64: ["sum", "avg", "prod"],  # real view; prod by fallback
        torch.complex128: ["sum"],
    }
    for dtype, ops in table.items():
        for name in ops:
            op = ReduceOp.parse(name)
            t = _ints(comm.rank, dtype)
            comm.allreduce(t, op=name)
            want = _reference(comm.size, dtype, op)
            assert _same_values(t, want), f"allreduce({dtype}, {name}): {t} != {want}"
            assert _identical_everywhere(comm, t), f"allreduce({dtype}, {name}) differs by rank"
            r = _ints(comm.rank, dtype)
            root = comm.size - 1
            comm.reduce(r, root=root, op=name)
            if comm.rank == root:
                assert _same_values(r, want), f"reduce({dtype}, {name}): {r} != {want}"


@scenario
def s_fast_path(comm: Any, ctx: Any) -> None:
    """The direct gloo calls with cached options: right results for every timeout, a bounded
    cache, and tensors the fast path must not take (autograd, bool) still reduced right."""
    import torch

    n, root = comm.size, comm.size - 1
    for i in range(70):  # more distinct timeouts than the options cache keeps
        t = torch.full((5,), float(comm.rank + i))
        comm.allreduce(t, timeout=30.0 + i)
        assert t.tolist() == [float(n * i + n * (n - 1) // 2)] * 5, (i, t)
        r = torch.full((3,), float(comm.rank + 1))
        comm.reduce(r, root=root, op="max", timeout=30.0 + i)
        if comm.rank == root:
            assert r.tolist() == [float(n)] * 3
        b = torch.full((2,), float(comm.rank))
        comm.broadcast_into(b, root=i % n, timeout=30.0 + i)
        assert b.tolist() == [float(i % n)] * 2
    assert 0 < len(comm.engine._opts) <= 64
    a = torch.full((4,), float(comm.rank), dtype=torch.float64)
    comm.allreduce(a, op="avg")
    assert a.tolist() == [(n - 1) / 2] * 4
    g = torch.full((3,), 1.0, requires_grad=True)
    comm.allreduce(g)
    assert g.detach().tolist() == [float(n)] * 3
    flags = torch.tensor([comm.rank == 0, True])
    comm.allreduce(flags, op="prod")
    assert flags.tolist() == [n == 1, True]


@scenario
def s_random_identical(comm: Any, ctx: Any) -> None:
    import torch

    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        gen = torch.Generator().manual_seed(17 + comm.rank)
        for op in ("sum", "avg", "max"):
            t = (torch.randn(4099, generator=gen) * 3).to(dtype)
            comm.allreduce(t, op=op)
            assert _identical_everywhere(comm, t), f"allreduce({dtype}, {op}) differs by rank"


@scenario
def s_views(comm: Any, ctx: Any) -> None:
    import torch

    rank, size = comm.rank, comm.size
    for dtype in (torch.float8_e5m2, torch.complex64, torch.bool, torch.int16, torch.bfloat16):
        for shape in ((), (3, 5), (300_000,)):  # 0-d, small (native), large (point to point)

            def block(r: int, _shape: Any = shape, _dtype: Any = dtype) -> Any:
                b = (torch.arange(math.prod(_shape)) % 61 + r).reshape(_shape)
                return (b % 3 == 0) if _dtype == torch.bool else b.float().to(_dtype)

            mine = block(rank)
            everyone = torch.stack([block(r) for r in range(size)])
            buf = block(rank).clone()
            comm.broadcast_into(buf, root=1)
            assert _same_bytes(buf, block(1)), f"broadcast_into {dtype} {shape}"
            out = torch.zeros_like(everyone)
            comm.allgather_into(out, mine)
            assert _same_bytes(out, everyone), f"allgather_into {dtype} {shape}"
            got = torch.zeros_like(everyone) if rank == 2 else None
            comm.gather_into(got, mine, root=2)
            if rank == 2:
                assert _same_bytes(got, everyone), f"gather_into {dtype} {shape}"
            piece = torch.zeros_like(mine)
            comm.scatter_into(piece, everyone if rank == 0 else None, root=0)
            assert _same_bytes(piece, block(rank)), f"scatter_into {dtype} {shape}"
    # send_buffer / recv_into, and a receive buffer of the wrong size: refused, channel drained
    right, left = (rank + 1) % size, (rank - 1) % size
    payload = torch.arange(40_000, dtype=torch.float32).to(torch.bfloat16) + rank
    work = comm.isend_buffer(payload, right, tag=3)
    out = torch.empty_like(payload)
    comm.recv_into(out, left, tag=3)
    work.wait()
    assert _same_bytes(out, torch.arange(40_000, dtype=torch.float32).to(torch.bfloat16) + left)
    work = comm.isend_buffer(torch.ones(10), right, tag=4)
    try:
        comm.recv_into(torch.empty(11), left, tag=4)
    except ctx.CollectiveMismatchError as err:
        assert "float32 (10,)" in str(err), err
    else:
        raise AssertionError("recv_into a buffer of the wrong size must be refused")
    work.wait()
    work = comm.isend(f"after-{rank}", right, tag=4)  # a send completes when it is received
    assert comm.recv(left, tag=4) == f"after-{left}", "the channel must still be in step"
    work.wait()


@scenario
def s_objects(comm: Any, ctx: Any) -> None:
    import torch

    rank, size = comm.rank, comm.size
    # a codec header longer than the envelope's inline room (80 buffers), from every root
    for root in range(size):
        obj = [torch.full((r + 1,), float(root)) for r in range(80)] if rank == root else None
        got = comm.broadcast(obj, root=root)
        assert len(got) == 80 and all(bool((t == root).all()) for t in got)
    # sizes that differ by rank, including nothing at all
    mine = bytes([rank]) * (rank * 150_000)
    assert comm.allgather(mine) == [bytes([r]) * (r * 150_000) for r in range(size)]
    got = comm.gather(None if rank == 1 else mine, root=1)
    if rank == 1:
        assert got == [None if r == 1 else bytes([r]) * (r * 150_000) for r in range(size)]
    else:
        assert got is None
    items = [b"", None, torch.zeros(50_000, dtype=torch.float8_e4m3fn)][:size]
    got = comm.scatter(items if rank == 2 else None, root=2)
    want = items[rank]
    assert (got == want) if not isinstance(want, torch.Tensor) else _same_bytes(got, want)
    comm.barrier()


@scenario
def s_resume(comm: Any, ctx: Any) -> None:
    """A receive that timed out is resumed by the next one: the late message is not lost."""
    if comm.rank == 1:
        try:
            comm.recv(0, tag=9, timeout=0.3)
        except ctx.CollectiveTimeoutError as err:
            assert err.ranks == (0,), err.ranks
        else:
            raise AssertionError("nothing was sent yet: recv must time out")
    comm.barrier()
    if comm.rank == 0:
        comm.send({"late": True}, 1, tag=9)
        comm.send("next", 1, tag=9)
    elif comm.rank == 1:
        assert comm.recv(0, tag=9) == {"late": True}
        assert comm.recv(0, tag=9) == "next"
    comm.barrier()


@scenario
def s_existing_group(comm: Any, ctx: Any) -> None:
    """A second communicator on the now-initialised torch.distributed: a private group."""
    import torch
    import torch.distributed as dist

    import collectives

    second = collectives.init("gloo", timeout=30)
    assert second.engine.process_group is not dist.group.WORLD
    assert second.allgather(comm.rank) == list(range(comm.size))
    t = torch.ones(3)
    second.allreduce(t)
    assert t.tolist() == [3.0] * 3
    ctx.extra["second"] = second  # kept for the abort scenario


@scenario
def s_mismatch(comm: Any, ctx: Any) -> None:
    """On a third communicator: rank 0 broadcasts while the others allgather."""
    import collectives

    third = collectives.init("gloo", timeout=30)
    start = time.monotonic()
    try:
        if comm.rank == 0:
            third.broadcast("x", root=0, timeout=TIMEOUT_S)
            third.barrier(timeout=TIMEOUT_S)
        else:
            third.allgather("y", timeout=TIMEOUT_S)
    except ctx.CollectiveMismatchError as err:
        # The others find rank 0's broadcast; rank 0 finds theirs in its broadcast's vote.
        assert 0 in err.ranks and comm.rank in err.ranks, err.ranks
        assert "broadcast" in str(err) and "allgather" in str(err)
    except ctx.CollectiveTimeoutError:
        assert comm.rank == 0  # its broadcast went out; the barrier then finds nobody
    else:
        raise AssertionError("mismatched collectives must fail")
    assert time.monotonic() - start < 2 * TIMEOUT_S + SLACK_S
    comm.barrier()  # the first communicator is untouched by the third one's failure


@scenario
def s_deadline(comm: Any, ctx: Any) -> None:
    """Rank 2 skips an allgather and a broadcast_into: the others time out naming it."""
    import torch

    if comm.rank == 2:
        time.sleep(TIMEOUT_S + 1.0)  # then the abort scenario, while the others still wait
        return
    start = time.monotonic()
    try:
        comm.broadcast_into(torch.zeros(4), root=2, timeout=TIMEOUT_S)
    except ctx.CollectiveTimeoutError as err:
        assert err.ranks == (2,), err
    else:
        raise AssertionError("rank 2 never broadcast: broadcast_into must time out")
    elapsed = time.monotonic() - start
    assert TIMEOUT_S - 0.1 <= elapsed < TIMEOUT_S + SLACK_S, elapsed
    assert comm.peers() == {r: "ok" for r in range(3) if r != comm.rank}


@scenario
def s_abort(comm: Any, ctx: Any) -> None:
    """Rank 2 aborts while waiting in a collective (second comm) and in a receive (first)."""
    import torch

    if comm.rank != 2:
        time.sleep(4.0)  # stay connected while rank 2 waits on us
        return
    for target, call in (
        (ctx.extra["second"], lambda c: c.broadcast_into(torch.zeros(4), root=0, timeout=30)),
        (comm, lambda c: c.recv(0, tag=77, timeout=30)),
    ):
        timer = threading.Timer(0.3, target.abort, args=("test interrupt",))
        timer.start()
        start = time.monotonic()
        try:
            call(target)
        except ctx.CommunicatorAbortedError as err:
            assert "test interrupt" in str(err), err
        else:
            raise AssertionError("abort() must fail the pending op")
        assert time.monotonic() - start < 1.5, time.monotonic() - start


@scenario
def s_exit(comm: Any, ctx: Any) -> None:
    """Rank 2's process exits in the middle of an allreduce; the others must not hang."""
    import torch

    t = torch.ones(4 << 20)
    comm.allreduce(t)  # warm: every connection is up
    if comm.rank == 2:
        threading.Timer(0.2, os._exit, args=(17,)).start()
    start = time.monotonic()
    try:
        for _ in range(50):
            comm.allreduce(t, timeout=TIMEOUT_S)
            comm.allgather(comm.rank, timeout=TIMEOUT_S)
    except ctx.ConnectionLostError as err:
        assert err.ranks in ((), (2,)), err.ranks
    except ctx.CollectiveTimeoutError:
        pass
    else:
        raise AssertionError("rank 2 is gone: an op must fail")
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S + 2.0


@scenario
def s_cma(comm: Any, ctx: Any) -> None:
    """Same host: peers read large buffers out of each other's memory (unless one opted out)."""
    import torch

    from collectives.backends import cma

    off = os.environ.get(cma.ENV) == "0"
    readers = comm.engine._engine.cma_readers
    sources = comm.engine._engine.cma_sources
    pids = comm.allgather(os.getpid())
    if off:
        assert readers == frozenset(), readers  # nobody may read a rank that did not probe
        assert sources == {}, sources
    else:
        others = {r for r in range(comm.size) if r != comm.rank}
        want = others - ({1} if os.environ.get("CMA_OFF_RANK") == "1" else set())
        assert readers == want, (readers, want)
        assert sources == {r: pids[r] for r in want}, (sources, pids)  # only the probed pids
    big = [torch.full((300_000,), float(comm.rank)), torch.arange(5), b"x" * 400_000]
    got = comm.allgather(big)
    for r, (t, small, raw) in enumerate(got):
        assert bool((t == r).all()) and small.tolist() == list(range(5)) and raw == b"x" * 400_000
    for root in range(comm.size):
        value = comm.broadcast(torch.full((1 << 20,), float(root)) if comm.rank == root else None,
                               root=root)  # fmt: skip
        assert bool((value == root).all())


PLANS = {
    "cma": ["cma"],
    "cma_off_1": ["cma"],
    "main": [*THREE_RANKS, "deadline", "abort"],
    "exit": ["exit"],
}


class _Ctx:
    def __init__(self) -> None:
        from collectives import errors

        self.CollectiveMismatchError = errors.CollectiveMismatchError
        self.CollectiveTimeoutError = errors.CollectiveTimeoutError
        self.CommunicatorAbortedError = errors.CommunicatorAbortedError
        self.ConnectionLostError = errors.ConnectionLostError
        self.extra: dict[str, Any] = {}


def main(plan: str) -> int:
    import collectives

    if plan == "cma_off_1":
        os.environ["CMA_OFF_RANK"] = "1"
        if os.environ["RANK"] == "1":
            os.environ["COMFY_CLUSTER_CMA"] = "0"

    comm = collectives.init("gloo", timeout=30)
    ctx = _Ctx()
    for name in PLANS[plan]:
        try:
            SCENARIOS[name](comm, ctx)
        except BaseException:
            print(f"rank {comm.rank} {name} FAILED\n{traceback.format_exc()}", flush=True)
            os._exit(1)  # peers are left inside a collective: do not wait for a clean close
        print(f"rank {comm.rank} {name} ok", flush=True)
    # Every plan ends with a timeout, abort or lost rank: peers may still be inside an op, so
    # exit without a collective shutdown (as the conformance runner's scenarios do).
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))


def test_nccl_rank_without_a_gpu_gets_one_line_naming_local_rank() -> None:
    import torch

    from collectives.backends.torch_rendezvous import _own_gpu
    from collectives.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"LOCAL_RANK=\d+ names no GPU.*gloo"):
        _own_gpu("nccl", torch.cuda.device_count())
    with pytest.raises(ConfigurationError, match="LOCAL_RANK=-1"):
        _own_gpu("nccl", -1)
