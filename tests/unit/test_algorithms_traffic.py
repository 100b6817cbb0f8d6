"""How many bytes each rank posts in the large-message algorithms (not how long they take).

A :class:`LocalBackend` subclass counts every byte each rank posts on the collective channel
(envelope agreement messages excluded), which is what a network transport would put on the wire.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import torch

from collectives.algorithms import large_broadcast, reduction, ring
from collectives.backends.base import BackendConfig, OpContext
from collectives.backends.envelope import Envelope
from collectives.backends.local import LocalBackend
from collectives.backends.p2p import COLLECTIVE_CHANNEL
from collectives.codec import Encoded, decode, encode
from collectives.deadline import Deadline
from collectives.reduce_op import ReduceOp

MiB = 1 << 20


class CountingBackend(LocalBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.posted = 0
        self.posts_to: list[int] = []  # the destination of every post, in order

    def _post(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        if channel == COLLECTIVE_CHANNEL:
            self.posted += msg.nbytes
            self.posts_to.append(dst)
        super()._post(dst, channel, env, msg, dl)


def _spmd(
    size: int,
    fn: Callable[[CountingBackend, OpContext], Any],
    posts_to: list[list[int]] | None = None,
) -> list[int]:
    """Run ``fn`` on every rank of a fresh counting world; bytes each rank posted (and, into
    ``posts_to``, each rank's destinations)."""
    name = f"traffic-{uuid.uuid4().hex}"
    backends = [
        CountingBackend.create(BackendConfig(rank=r, size=size, world=name)) for r in range(size)
    ]
    errors: list[BaseException] = []

    def main(b: CountingBackend) -> None:
        try:
            fn(b, OpContext("op", 1, Deadline.start(60.0, "op", 1)))
        except BaseException as err:  # reported below, on the test's thread
            errors.append(err)

    threads = [threading.Thread(target=main, args=(b,), daemon=True) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if posts_to is not None:
        posts_to.extend(b.posts_to for b in backends)
    for b in backends:
        b.close()
    if errors:
        raise errors[0]
    return [b.posted for b in backends]


@pytest.mark.parametrize("size", [3, 4, 5, 8])
def test_large_broadcast_into_root_sends_about_two_copies(size: int) -> None:
    payload = 4 * MiB
    root = size - 2
    results: dict[int, bool] = {}

    def fn(b: CountingBackend, ctx: OpContext) -> None:
        want = torch.arange(payload // 4, dtype=torch.float32)
        buf = want.clone() if b.rank == root else torch.zeros_like(want)
        b.broadcast_into(buf, root, ctx)
        results[b.rank] = bool(torch.equal(buf, want))

    posted = _spmd(size, fn)
    assert results == dict.fromkeys(range(size), True)
    head_copies = (size - 1).bit_length()  # the root's children in the binomial tree
    if size <= large_broadcast.TREE_MAX_RANKS:
        # The whole message down the tree: the root sends one copy per child, at most two.
        assert payload * head_copies <= posted[root] <= payload * head_copies * 1.01
        assert head_copies <= 2
    else:
        # The large path: the head to the root's children, then (size-1)/size of the tail
        # twice (scatter, then the ring).
        tail = payload - large_broadcast.HEAD_BYTES
        bound = head_copies * large_broadcast.HEAD_BYTES + 2 * tail * (size - 1) / size
        assert posted[root] <= bound * 1.01
    assert posted[root] <= 2.3 * payload
    assert max(posted) <= 2.3 * payload


def test_large_object_broadcast_root_sends_about_two_copies() -> None:
    size, root = 8, 0
    obj = {"x": torch.ones(MiB), "y": b"z" * MiB, "n": [1, 2, 3]}  # ~5 MiB in 2 buffers
    nbytes = encode(obj).nbytes
    ok: dict[int, bool] = {}

    def fn(b: CountingBackend, ctx: OpContext) -> None:
        got = decode(*_parts(b.broadcast(encode(obj) if b.rank == root else None, root, ctx)))
        ok[b.rank] = torch.equal(got["x"], obj["x"]) and got["y"] == obj["y"]

    posted = _spmd(size, fn)
    assert ok == dict.fromkeys(range(size), True)
    assert posted[root] <= 2.3 * nbytes
    assert posted[root] < 3 * nbytes  # what the binomial tree would send with 8 ranks


def _parts(msg: Encoded) -> tuple[bytes, list[memoryview]]:
    return msg.header, msg.buffers


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_large_allreduce_moves_2_n_minus_1_over_n_of_the_tensor(size: int) -> None:
    numel = MiB + 3  # 4 MiB of float32, not divisible by the world size
    results: dict[int, bytes] = {}

    def fn(b: CountingBackend, ctx: OpContext) -> None:
        t = torch.full((numel,), float(b.rank))
        b.allreduce(t, ReduceOp.SUM, ctx)
        results[b.rank] = bytes(t.numpy())

    posted = _spmd(size, fn)
    want = torch.full((numel,), float(size * (size - 1) // 2))
    assert all(r == bytes(want.numpy()) for r in results.values())
    ideal = 2 * (size - 1) / size * numel * 4
    for sent in posted:
        assert ideal <= sent <= ideal * 1.01  # codec headers are the only extra


@pytest.mark.parametrize("size", [3, 4, 6])
def test_large_reduce_moves_each_tensor_once_on_the_tree_and_balances_on_the_ring(
    size: int,
) -> None:
    numel = MiB
    root = 1
    got: dict[int, bool] = {}

    def fn(b: CountingBackend, ctx: OpContext) -> None:
        t = torch.full((numel,), float(b.rank + 1))
        b.reduce(t, root, ReduceOp.SUM, ctx)
        if b.rank == root:
            got[root] = bool((t == size * (size + 1) // 2).all())

    posted = _spmd(size, fn)
    assert got == {root: True}
    tensor = numel * 4
    for rank, sent in enumerate(posted):
        if size <= reduction.TREE_MAX_RANKS:
            # Up the tree: every non-root sends one tensor (its own or its subtree's partial).
            ideal = 0.0 if rank == root else tensor
        else:
            # Every rank sends (size-1)/size of the tensor in the reduce-scatter; non-roots
            # then send their block (1/size) to the root.
            ideal = tensor * (size - 1) / size + (0 if rank == root else tensor / size)
        assert ideal <= sent <= ideal * 1.01


@pytest.mark.parametrize("size", [3, 4, 5])
def test_allgather_posts_directly_in_small_worlds_and_around_the_ring_in_larger(size: int) -> None:
    numel = MiB // 4
    ok: dict[int, bool] = {}

    def fn(b: CountingBackend, ctx: OpContext) -> None:
        out = torch.empty(size * numel)
        b.allgather_into(out, torch.full((numel,), float(b.rank)), ctx)
        want = torch.arange(size, dtype=torch.float32).repeat_interleave(numel)
        ok[b.rank] = bool(torch.equal(out, want))

    dests: list[list[int]] = []
    posted = _spmd(size, fn, dests)
    assert ok == dict.fromkeys(range(size), True)
    for rank, to in enumerate(dests):
        if size <= ring.DIRECT_MAX_RANKS:  # its own block, once to every other rank
            assert sorted(to) == [p for p in range(size) if p != rank]
        else:  # size - 1 blocks, all to its right neighbour
            assert to == [(rank + 1) % size] * (size - 1)
        assert numel * 4 * (size - 1) <= posted[rank] <= numel * 4 * (size - 1) * 1.01
