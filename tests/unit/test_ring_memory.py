"""The ring reduction's memory: on a link whose ``send`` copies (``send_copies``, the P2P seam),
an allreduce keeps every partial in the tensor's own storage (no fresh buffer per op: a block
over ~32 MiB is fresh ``mmap`` memory, a page fault per 4 KiB), with the same bytes; a link that
sends by reference still gets private copies.  A two-rank link over queues, real codec."""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from collectives.algorithms import ring_reduce
from collectives.backends.p2p import decode_tensor
from collectives.codec import CodecOptions, Encoded, encode
from collectives.deadline import Deadline
from collectives.reduce_op import ReduceOp


class _QueueLink:
    def __init__(self, rank: int, boxes: list[queue.Queue[Any]], copies: bool) -> None:
        self.rank, self.size, self._boxes = rank, 2, boxes
        self.codec = CodecOptions()
        self.deadline = Deadline.start(30.0, "allreduce", rank)
        self.sent: list[Encoded] = []
        if copies:
            self.send_copies = True

    def send(self, dst: int, msg: Encoded) -> None:
        self.sent.append(msg)
        self._boxes[dst].put(
            Encoded(bytes(msg.header), [memoryview(bytes(b)) for b in msg.buffers])
        )

    def recv(self, src: int, into: memoryview | None = None) -> Encoded:
        msg: Encoded = self._boxes[self.rank].get(timeout=30)
        return msg

    def has_message(self, src: int) -> bool:
        return not self._boxes[self.rank].empty()

    def decode_tensor(self, msg: Encoded, src: int) -> torch.Tensor:
        return decode_tensor(msg, self.codec, "allreduce", src)


def _allreduce_pair(copies: bool, numel: int) -> list[tuple[torch.Tensor, list[bool]]]:
    boxes: list[queue.Queue[Any]] = [queue.Queue(), queue.Queue()]
    out: list[Any] = [None, None]

    def run(rank: int) -> None:
        t = torch.arange(numel, dtype=torch.float32) * (rank + 1) + 0.25
        link = _QueueLink(rank, boxes, copies)
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        flat = t.view(-1)
        parts, mine = ring_reduce.reduce_scatter(link, flat, ReduceOp.SUM, scratch=True)
        inside = [lo <= mine.data_ptr() < hi]
        inside += [_in(m, lo, hi) for m in link.sent]
        ring_reduce.allgather_blocks(link, flat, parts, mine)
        out[rank] = (t, inside)

    return _both(run, out)


def _both(run: Any, out: list[Any]) -> list[Any]:
    """``run(rank)`` on two threads, one per rank of the pair; ``out`` once both are done."""
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return out


def _address(msg: Encoded) -> int:
    import numpy as np

    return int(np.frombuffer(msg.buffers[0], dtype=np.uint8).ctypes.data)


def _in(msg: Encoded, lo: int, hi: int) -> bool:
    return lo <= _address(msg) < hi


def _want(numel: int) -> torch.Tensor:
    base = torch.arange(numel, dtype=torch.float32)
    return (base * 2 + 0.25) + (base + 0.25)  # rank 1's values, then rank 0's: the ring order


def test_a_copying_link_reduces_in_the_tensors_own_storage() -> None:
    for t, inside in _allreduce_pair(True, 100_000):
        assert torch.equal(t, _want(100_000))
        assert inside[0], "the reduced block was a fresh buffer"
        assert all(inside[1:]), "a block was copied before it was sent"


def test_an_uneven_split_falls_back_where_the_sent_block_is_shorter() -> None:
    """Blocks of 50,001 and 50,000 elements: rank 0's partial does not fit the block it sent
    (a fresh buffer then), rank 1's does; both end with the same, right bytes."""
    (t0, in0), (t1, in1) = _allreduce_pair(True, 100_001)
    assert torch.equal(t0, _want(100_001)) and torch.equal(t1, _want(100_001))
    assert (in0[0], in1[0]) == (False, True)


def test_a_link_that_sends_by_reference_gets_private_copies() -> None:
    numel = 100_001
    for t, inside in _allreduce_pair(False, numel):
        assert t[0].item() == 0.25 * 2 and t[-1].item() == (numel - 1) * 3 + 0.5
        assert not inside[0] and not inside[1], "a buffer sent by reference was reused"


def test_encode_of_a_slice_aliases_the_tensor() -> None:
    """What the in-storage checks above rely on: encoding a contiguous slice copies nothing."""
    t = torch.zeros(10)
    assert _in(encode(t[2:5]), t.data_ptr(), t.data_ptr() + 40)


def _reduce_pair(numel: int, ops: int) -> list[tuple[torch.Tensor, list[int]]]:
    """``ops`` reduces to rank 0 over a copying pair: each rank's tensor after the last one,
    and the address of every partial rank 1 sent (its reduced block, to the root)."""
    boxes: list[queue.Queue[Any]] = [queue.Queue(), queue.Queue()]
    out: list[Any] = [None, None]

    def run(rank: int) -> None:
        link = _QueueLink(rank, boxes, True)
        sent_from: list[int] = []
        for _ in range(ops):
            t = torch.arange(numel, dtype=torch.float32) * (rank + 1) + 0.25
            ring_reduce.reduce(link, t, 0, ReduceOp.SUM)
            if rank == 1:
                sent_from.append(_address(link.sent[-1]))
        out[rank] = (t, sent_from)

    return _both(run, out)


def test_a_non_root_reduces_in_scratch_memory_reused_across_ops() -> None:
    # 1M float32 per block: a fresh allocation each op would be fresh pages (see scratch.py).
    numel = 2 << 20
    (root, _), (other, sent_from) = _reduce_pair(numel, 3)
    assert torch.equal(root, _want(numel))
    assert torch.equal(other, torch.arange(numel, dtype=torch.float32) * 2 + 0.25)  # unchanged
    assert len(set(sent_from)) == 1, "each reduce's partial was a fresh buffer"
