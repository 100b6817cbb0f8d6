"""Communicator behaviour beyond the conformance suite: abort, poisoning, Work, init, options."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import collectives
from collectives.algorithms.link import binomial_parent_children
from collectives.errors import (
    BackendUnavailableError,
    CollectiveTimeoutError,
    CommunicatorAbortedError,
    ConfigurationError,
    ConnectionLostError,
    InvalidArgumentError,
)
from collectives.options import CommOptions
from collectives.reduce_op import ReduceOp
from collectives.testing import run_local
from collectives.work import Work


def test_single_rank_world_is_identity() -> None:
    with collectives.init("local") as comm:
        assert (comm.rank, comm.size, comm.backend) == (0, 1, "local")
        assert comm.broadcast({"a": 1}) == {"a": 1}
        assert comm.gather(5) == [5]
        assert comm.allgather("x") == ["x"]
        assert comm.scatter([7]) == 7
        t = torch.arange(4.0)
        assert torch.equal(comm.allreduce(t), torch.arange(4.0))
        comm.barrier()


def test_timeout_names_the_silent_rank_and_poisons() -> None:
    def fn(comm: collectives.Communicator) -> str:
        if comm.rank == 1:
            time.sleep(1.2)
            return "slept"
        start = time.monotonic()
        with pytest.raises(CollectiveTimeoutError) as info:
            comm.gather(0, root=0, timeout=0.3)
        assert 0.25 < time.monotonic() - start < 2.0
        assert info.value.ranks == (1,)
        assert "rank(s) 1" in str(info.value) and "COMFY_CLUSTER_TIMEOUT" in str(info.value)
        with pytest.raises(CommunicatorAbortedError, match="earlier failure"):
            comm.barrier()
        return "timed out"

    assert run_local(2, fn, close=False) == ["timed out", "slept"]


def test_p2p_recv_timeout_does_not_poison() -> None:
    def fn(comm: collectives.Communicator) -> object:
        if comm.rank == 0:
            with pytest.raises(CollectiveTimeoutError):
                comm.recv(1, tag=5, timeout=0.2)
            comm.barrier()
            return comm.recv(1, tag=5, timeout=5)
        comm.barrier()
        comm.send("late", 0, tag=5)
        return None

    assert run_local(2, fn)[0] == "late"


def test_abort_unblocks_a_waiting_rank_promptly() -> None:
    def fn(comm: collectives.Communicator) -> float:
        if comm.rank == 1:
            time.sleep(0.3)
            return 0.0
        timer = threading.Timer(0.2, comm.abort, args=("user pressed interrupt",))
        timer.start()
        start = time.monotonic()
        with pytest.raises(CommunicatorAbortedError, match="interrupt"):
            comm.recv(1, timeout=30)
        timer.join()
        with pytest.raises(CommunicatorAbortedError):
            comm.barrier()
        return time.monotonic() - start

    elapsed = run_local(2, fn, close=False)[0]
    assert elapsed < 2.0


def test_peer_that_closes_is_reported_as_lost() -> None:
    def fn(comm: collectives.Communicator) -> object:
        if comm.rank == 1:
            return None  # run_local closes this rank's communicator
        with pytest.raises(ConnectionLostError) as info:
            comm.recv(1, timeout=30)
        assert info.value.ranks == (1,)
        return comm.peers()

    assert run_local(2, fn)[0] == {1: "lost"}


def test_context_manager_aborts_on_error() -> None:
    comm = collectives.init("local")
    with pytest.raises(RuntimeError), comm:
        raise RuntimeError("boom")
    with pytest.raises(CommunicatorAbortedError):
        comm.barrier()


def test_scatter_wrong_length_is_a_local_error() -> None:
    with collectives.init("local") as comm, pytest.raises(InvalidArgumentError, match="exactly 1"):
        comm.scatter([1, 2])


def test_work_handle() -> None:
    work: Work[int] = Work("op", 0)
    assert not work.is_completed()
    with pytest.raises(CollectiveTimeoutError):
        work.wait(timeout=0.01)
    seen: list[bool] = []
    work.add_done_callback(lambda w: seen.append(w.is_success()))
    work.set_result(3)
    assert work.wait(timeout=1) == 3 and seen == [True] and work.exception() is None
    failed: Work[int] = Work("op", 0)
    failed.set_exception(ValueError("x"))
    assert isinstance(failed.exception(), ValueError)
    with pytest.raises(ValueError):
        failed.wait()


def test_init_errors_and_detection() -> None:
    with pytest.raises(ConfigurationError, match="unknown backend 'nope'"):
        collectives.init("nope")
    with pytest.raises(ConfigurationError, match="needs rank="):
        collectives.init("local", size=2)
    assert collectives.detect_backend({}) == "local"
    assert collectives.detect_backend({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert collectives.detect_backend(env) == "udp"
    assert issubclass(BackendUnavailableError, ConfigurationError)


def test_options_from_env() -> None:
    opts = CommOptions.from_env({"COMFY_CLUSTER_TIMEOUT": "2.5"})
    assert opts.timeout == 2.5 and not opts.codec.allow_pickle
    opts = CommOptions.from_env({"COMFY_CLUSTER_ALLOW_PICKLE": "1"})
    assert opts.codec.allow_pickle
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_TIMEOUT"):
        CommOptions.from_env({"COMFY_CLUSTER_TIMEOUT": "soon"})
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_COMPRESSION"):
        CommOptions.from_env({"COMFY_CLUSTER_COMPRESSION": "gzip"})


def test_reduce_op_parse() -> None:
    assert ReduceOp.parse("SUM") is ReduceOp.SUM
    with pytest.raises(ConfigurationError, match="unknown reduce op"):
        ReduceOp.parse("median")


@pytest.mark.parametrize("size", range(1, 17))
def test_binomial_tree_spans_every_rank_once(size: int) -> None:
    parents = {}
    for v in range(size):
        parent, children = binomial_parent_children(v, size)
        assert (parent is None) == (v == 0)
        for child in children:
            assert child not in parents
            parents[child] = v
            assert binomial_parent_children(child, size)[0] == v
    assert sorted(parents) == list(range(1, size))


def test_default_codec_refuses_pickled_objects_from_peers() -> None:
    pickling = CommOptions(codec=collectives.CodecOptions(allow_pickle=True))

    def fn(comm: collectives.Communicator) -> object:
        if comm.rank == 0:
            comm.options = pickling
            comm.send({1, 2}, 1)  # a set travels only pickled
            comm.options = CommOptions()
            with pytest.raises(collectives.CodecError):
                comm.send({1, 2}, 1)  # refused at the sender without the opt-in
            comm.send([1, "two", torch.ones(2)], 1)
            return None
        with pytest.raises(collectives.CodecError):
            comm.recv(0)
        return comm.recv(0)

    got = run_local(2, fn)[1]
    assert got[:2] == [1, "two"] and torch.equal(got[2], torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_reductions_wrap_and_order_like_native_unsigned(dtype: torch.dtype) -> None:
    from collectives.reduce_op import combine_

    bits = {torch.uint16: 16, torch.uint32: 32, torch.uint64: 64}[dtype]
    top = 2 ** (bits - 1)
    a = torch.tensor([top + 5, 1, 2**bits - 1], dtype=dtype)
    b = torch.tensor([3, top + 7, 2], dtype=dtype)
    expect = {
        ReduceOp.SUM: [
            (x + y) % 2**bits
            for x, y in zip([top + 5, 1, 2**bits - 1], [3, top + 7, 2], strict=True)
        ],
        ReduceOp.MAX: [top + 5, top + 7, 2**bits - 1],
        ReduceOp.MIN: [3, 1, 2],
    }
    for op, want in expect.items():
        x = a.clone()
        combine_(x, b, op)
        assert x.dtype == dtype and [int(v) % 2**bits for v in x.tolist()] == want, op


def test_async_ops_fill_buffers_made_in_inference_mode() -> None:
    # ComfyUI runs nodes under torch.inference_mode(); async ops run on other threads, where
    # writing into inference tensors is refused unless the op runs in that mode too.
    def rank(comm: collectives.Communicator) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            mine = torch.full((comm.rank + 1, 2), float(comm.rank))
            out = torch.empty(3, 2) if comm.rank == 0 else None
            blocks = [out[:1], out[1:]] if out is not None else None
            comm.igatherv_into(blocks, mine).wait()
            got = torch.empty(2)
            if comm.rank == 0:
                comm.isend_buffer(torch.ones(2), 1).wait()
            else:
                comm.irecv_into(got, 0).wait()
        return (out if out is not None else mine), got

    (gathered, _), (_, received) = run_local(2, rank)
    assert gathered.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert received.tolist() == [1.0, 1.0]


def test_blocking_in_place_call_waits_behind_queued_async_ops() -> None:
    # Blocking in-place calls run inline on the caller's thread only when nothing is queued;
    # otherwise they must take their turn, or the ranks would pair different ops.
    def rank(comm: collectives.Communicator) -> list[float]:
        first = torch.full((4,), float(comm.rank + 1))
        second = torch.full((4,), 10.0 * (comm.rank + 1))
        third = torch.full((2,), float(comm.rank))
        work = comm.iallreduce(first)  # queued on the worker
        comm.allreduce(second)  # blocking: behind the queued one
        got = comm.reduce(third, root=1, op="max")
        work.wait()
        assert work.result() is first
        if comm.rank == 1:
            assert got is third
        else:
            assert got is None
        return [first[0].item(), second[0].item(), third[0].item()]

    results = run_local(3, rank)
    assert [r[:2] for r in results] == [[6.0, 60.0]] * 3
    assert results[1][2] == 2.0


def test_blocking_in_place_failure_poisons_like_async() -> None:
    # The inline path raises the error itself (no Work); a timeout must still poison.
    def rank(comm: collectives.Communicator) -> str:
        if comm.rank == 1:
            time.sleep(0.6)
            return "skipped"
        with pytest.raises(CollectiveTimeoutError):
            comm.allreduce(torch.ones(3), timeout=0.2)
        with pytest.raises(CommunicatorAbortedError):
            comm.broadcast_into(torch.ones(3))
        return "poisoned"

    assert run_local(2, rank) == ["poisoned", "skipped"]
