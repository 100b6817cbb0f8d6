"""The reduce's tree for large tensors in worlds of up to ``TREE_MAX_RANKS`` ranks
(``algorithms.reduction``): which ranks send what from where, over an in-process link whose
sends copy (the P2P seam's contract) or go by reference (the torch link's), real codec.

Its results are checked with every other path in tests/unit/test_algorithms.py; here: a leaf
sends its own tensor without a private copy where the link copies anyway, a rank with children
sends its partial from scratch memory reused across ops (not a fresh tensor: fresh pages each
op), the root combines into its own tensor, and larger worlds keep the ring."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
import torch

from collectives import Communicator
from collectives.algorithms import reduction, ring_reduce
from collectives.backends.p2p import decode_tensor
from collectives.codec import CodecOptions, Encoded, encode
from collectives.deadline import Deadline
from collectives.reduce_op import ReduceOp
from collectives.testing.spmd import run_threads

NUMEL = 1 << 20  # float32: 4 MiB, a large tensor (over the ring's threshold)


class _Link:
    """Rank ``rank`` of an in-process world: one queue per (source, destination) pair."""

    def __init__(self, rank: int, size: int, boxes: dict[tuple[int, int], Any], copies: bool):
        self.rank, self.size, self._boxes = rank, size, boxes
        self.codec = CodecOptions()
        self.deadline = Deadline.start(30.0, "reduce", rank)
        self.sent: list[tuple[int, int]] = []  # (destination, address of the first buffer)
        if copies:
            self.send_copies = True

    def send(self, dst: int, msg: Encoded) -> None:
        self.sent.append((dst, _address(msg)))
        # A copying link owns a copy when send returns; the other passes the buffers on.
        bufs = (
            [memoryview(bytes(b)) for b in msg.buffers]
            if hasattr(self, "send_copies")
            else msg.buffers
        )
        self._boxes[self.rank, dst].put(Encoded(bytes(msg.header), list(bufs)))

    def recv(self, src: int, into: memoryview | None = None) -> Encoded:
        msg: Encoded = self._boxes[src, self.rank].get(timeout=30)
        return msg

    def has_message(self, src: int) -> bool:
        return not self._boxes[src, self.rank].empty()

    def decode_tensor(self, msg: Encoded, src: int) -> torch.Tensor:
        return decode_tensor(msg, self.codec, "reduce", src)


def _address(msg: Encoded) -> int:
    import numpy as np

    return int(np.frombuffer(msg.buffers[0], dtype=np.uint8).ctypes.data)


def _world(size: int, copies: bool, ops: int, root: int) -> list[dict[str, Any]]:
    """``ops`` sum-reduces to ``root``; per rank: its tensor after the last, the address range
    of that tensor and of each op's, and what it sent (an op's tensor may reuse the memory of
    the previous op's freed copy, so a sent address is only compared with its own op's)."""
    boxes = {(s, d): queue.Queue() for s in range(size) for d in range(size)}
    out: list[Any] = [None] * size

    def run(rank: int) -> None:
        link = _Link(rank, size, boxes, copies)
        ranges: list[tuple[int, int]] = []
        for _ in range(ops):
            t = torch.full((NUMEL,), float(rank + 1))
            reduction.reduce_tensor(link, t, root, ReduceOp.SUM)
            ranges.append((t.data_ptr(), t.data_ptr() + NUMEL * 4))
        out[rank] = {"tensor": t, "range": ranges[-1], "ranges": ranges, "sent": link.sent}

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert all(o is not None for o in out), "a rank did not finish"
    return out


def _inside(address: int, span: tuple[int, int]) -> bool:
    return span[0] <= address < span[1]


@pytest.mark.parametrize("root", [0, 2])
def test_four_ranks_reduce_on_the_tree_from_scratch_memory(root: int) -> None:
    ops = 3
    got = _world(4, True, ops, root)
    total = float(sum(range(1, 5)))
    for rank, o in enumerate(got):
        want = total if rank == root else float(rank + 1)  # non-roots keep their values
        assert torch.equal(o["tensor"], torch.full((NUMEL,), want)), rank
    # Binomial tree from the root: vrank 1 and 3 are leaves, 2 has child 3, the root 1 and 2.
    leaf, middle = (root + 1) % 4, (root + 2) % 4
    assert [d for d, _ in got[leaf]["sent"]] == [root] * ops
    assert all(_inside(a, got[leaf]["range"]) for _, a in got[leaf]["sent"][-1:]), (
        "a leaf on a copying link sent a private copy of its tensor"
    )
    middle_sent = got[middle]["sent"]
    assert [d for d, _ in middle_sent] == [root] * ops
    assert len({a for _, a in middle_sent}) == 1, "each reduce's partial was a fresh buffer"
    assert not _inside(middle_sent[-1][1], got[middle]["range"])
    assert got[root]["sent"] == []


def test_a_link_that_sends_by_reference_gets_private_copies() -> None:
    got = _world(2, False, 2, 0)
    assert torch.equal(got[0]["tensor"], torch.full((NUMEL,), 3.0))
    assert torch.equal(got[1]["tensor"], torch.full((NUMEL,), 2.0))
    pairs = zip(got[1]["sent"], got[1]["ranges"], strict=True)
    assert not any(_inside(a, span) for (_, a), span in pairs), (
        "the leaf lent its own tensor to a link that sends by reference"
    )


def _paths(comm: Communicator) -> list[str]:
    calls: list[str] = []
    for numel in (ring_reduce.RING_MIN_BYTES // 4 + 3, 37):
        t = torch.full((numel,), float(comm.rank))
        comm.reduce(t, root=comm.size - 1)
        ok = comm.rank != comm.size - 1 or bool((t == sum(range(comm.size))).all())
        calls.append(f"{numel} {ok}")
    return calls


@pytest.mark.parametrize("size", [reduction.TREE_MAX_RANKS, reduction.TREE_MAX_RANKS + 1])
def test_larger_worlds_reduce_large_tensors_on_the_ring(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rings: list[int] = []
    inner = ring_reduce.reduce
    lock = threading.Lock()

    def counted(link: Any, tensor: torch.Tensor, root: int, op: ReduceOp) -> None:
        with lock:
            rings.append(link.rank)
        inner(link, tensor, root, op)

    monkeypatch.setattr(ring_reduce, "reduce", counted)
    results = run_threads("local", size, _paths, timeout=60.0, op_timeout=30.0)
    assert all(r == [f"{ring_reduce.RING_MIN_BYTES // 4 + 3} True", "37 True"] for r in results)
    ring = size > reduction.TREE_MAX_RANKS
    assert sorted(rings) == (list(range(size)) if ring else [])


def test_encode_of_a_contiguous_tensor_aliases_it() -> None:
    """What the leaf's check above relies on: encoding a contiguous tensor copies nothing."""
    t = torch.zeros(10)
    assert _inside(_address(encode(t)), (t.data_ptr(), t.data_ptr() + 40))
