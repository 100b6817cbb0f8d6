"""The collectives under test: what each one moves, its buffers, and how our library calls it.

Every sized op works on a per-rank float32 tensor of ``size`` bytes; ops that collect or hand out
one block per rank also get an ``N``-block buffer.  The same buffers serve our call and the raw
engine's call, so both move the same bytes from the same (pre-touched) memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from collectives import Communicator

ROOT = 0

Call = Callable[[], Any]


@dataclass(frozen=True)
class OpSpec:
    name: str
    sized: bool  # barrier moves no payload: it runs once, not once per size
    object_api: bool  # has an object-API twin (broadcast/gather/allgather/scatter)
    # Bytes that must cross between ranks for one call (the "aggregate" traffic), per size & N.
    delivered: Callable[[int, int], int]
    # The N-block buffer: who needs it ("all", "root" or "" for none).
    blocks: str = ""
    # p2p (rank 0 to rank 1) is the ``p2p`` subcommand's goodput cell, not a collective.
    collective: bool = True


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("broadcast", True, True, lambda s, n: s * (n - 1)),
        OpSpec("scatter", True, True, lambda s, n: s * (n - 1), blocks="root"),
        OpSpec("gather", True, True, lambda s, n: s * (n - 1), blocks="root"),
        OpSpec("allgather", True, True, lambda s, n: s * n * (n - 1), blocks="all"),
        OpSpec("allreduce", True, False, lambda s, n: 2 * s * (n - 1)),
        OpSpec("reduce", True, False, lambda s, n: s * (n - 1)),
        OpSpec("barrier", False, False, lambda s, n: 0),
        OpSpec("p2p", True, False, lambda s, n: s, collective=False),
    )
}
COLLECTIVE_OPS = [name for name, spec in OPS.items() if spec.collective]


def float32_tensor(nbytes: int, fill: float = 0.0) -> torch.Tensor:
    """A pre-touched tensor: numpy-allocated (no torch page-fault penalty), every page written.

    Zeros keep repeated sums finite, so reductions never slow down on inf/NaN.
    """
    import torch

    array = np.empty(nbytes // 4, dtype=np.float32)
    array.fill(fill)
    return torch.from_numpy(array)


@dataclass
class Buffers:
    """What one rank holds for one (op, size) cell."""

    rank: int
    size: int  # world size
    tensor: torch.Tensor  # this rank's block (send block, or receive block for scatter)
    blocks: torch.Tensor | None  # size x tensor: gather/allgather receive, scatter send
    items: list[torch.Tensor] | None  # scatter's object-API items (root only), one per rank

    @property
    def is_root(self) -> bool:
        return self.rank == ROOT


def make_buffers(op: OpSpec, nbytes: int, rank: int, size: int) -> Buffers:
    tensor = float32_tensor(max(nbytes, 4))
    wants_blocks = op.blocks == "all" or (op.blocks == "root" and rank == ROOT)
    blocks = float32_tensor(max(nbytes, 4) * size) if wants_blocks else None
    items = None
    if op.name == "scatter" and op.object_api and rank == ROOT:
        # What an object-API user passes: one independent tensor per rank.
        items = [float32_tensor(max(nbytes, 4)) for _ in range(size)]
    return Buffers(rank, size, tensor, blocks, items)


def ours_inplace(comm: Communicator, op: str, b: Buffers) -> Call:
    """Our in-place buffer API for ``op`` on ``b``: the thin-wrapper fast path."""
    t, big = b.tensor, b.blocks
    calls: dict[str, Call] = {
        "broadcast": lambda: comm.broadcast_into(t, root=ROOT),
        "scatter": lambda: comm.scatter_into(t, big, root=ROOT),
        "gather": lambda: comm.gather_into(big, t, root=ROOT),
        "allgather": lambda: comm.allgather_into(big, t),
        "allreduce": lambda: comm.allreduce(t, op="sum"),
        "reduce": lambda: comm.reduce(t, root=ROOT),
        "barrier": comm.barrier,
        "p2p": _p2p(comm, t),
    }
    return calls[op]


def _p2p(comm: Communicator, t: torch.Tensor) -> Call:
    if comm.rank == 0:
        return lambda: comm.send_buffer(t, 1)
    if comm.rank == 1:
        return lambda: comm.recv_into(t, 0)
    return lambda: None


def ours_object(comm: Communicator, op: str, b: Buffers) -> Call:
    """Our object API for ``op`` with the tensor itself as the object (pickle-5, out of band)."""
    t, root = b.tensor, b.is_root
    calls: dict[str, Call] = {
        "broadcast": lambda: comm.broadcast(t if root else None, root=ROOT),
        "scatter": lambda: comm.scatter(b.items if root else None, root=ROOT),
        "gather": lambda: comm.gather(t, root=ROOT),
        "allgather": lambda: comm.allgather(t),
    }
    return calls[op]


def check_results(comm: Communicator, op: str, b: Buffers, apis: list[str]) -> None:
    """Run our calls once on marked data and check what arrived, then zero the buffers again.

    Timing a call that moved nothing (or the wrong block) would be worse than no number at all.
    """
    spec, n, rank = OPS[op], b.size, b.rank
    t, big = b.tensor, b.blocks
    if not spec.sized:
        return
    if "inplace" in apis or not spec.object_api:
        _mark(op, b)
        ours_inplace(comm, op, b)()
        if op == "broadcast":
            ok = bool(t.eq(1).all())
        elif op == "scatter":
            ok = bool(t.eq(rank + 1).all())
        elif op in ("gather", "allgather"):
            ok = big is None or _blocks_numbered(big, n)
        elif op == "p2p":
            ok = rank != 1 or bool(t.eq(1).all())
        elif op == "allreduce" or (op == "reduce" and b.is_root):
            ok = bool(t.eq(n).all())
        else:
            ok = True
        _expect(ok, op, "in-place", rank)
    if "object" in apis and spec.object_api:
        _mark(op, b)
        got = ours_object(comm, op, b)()
        if op == "broadcast":
            ok = bool(got.eq(1).all())
        elif op == "scatter":
            ok = bool(got.eq(rank + 1).all())
        else:  # gather (root) and allgather: a list of every rank's tensor
            ok = got is None or all(bool(x.eq(i + 1).all()) for i, x in enumerate(got))
        _expect(ok, op, "object", rank)
    for buf in (t, big, *(b.items or [])):
        if buf is not None:
            buf.zero_()


def _mark(op: str, b: Buffers) -> None:
    t, big = b.tensor, b.blocks
    if op in ("broadcast", "p2p"):
        t.fill_(1.0 if b.is_root else 0.0)
    elif op == "scatter":
        t.zero_()
        if big is not None:
            for i, block in enumerate(big.view(b.size, -1)):
                block.fill_(i + 1)
        for i, item in enumerate(b.items or []):
            item.fill_(i + 1)
    elif op in ("gather", "allgather"):
        t.fill_(b.rank + 1)
        if big is not None:
            big.zero_()
    else:
        t.fill_(1.0)


def _blocks_numbered(big: torch.Tensor, n: int) -> bool:
    return all(bool(block.eq(i + 1).all()) for i, block in enumerate(big.view(n, -1)))


def _expect(ok: bool, op: str, api: str, rank: int) -> None:
    if not ok:
        raise RuntimeError(f"our {api} {op} delivered wrong data on rank {rank}: not timing it")
