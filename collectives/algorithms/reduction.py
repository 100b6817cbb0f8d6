"""Binomial-tree reduce and reduce-then-broadcast allreduce on tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from collectives.algorithms.link import Link, binomial_parent_children
from collectives.algorithms.rooted import broadcast
from collectives.codec import encode
from collectives.errors import RemoteProtocolError
from collectives.reduce_op import ReduceOp, combine_, finish_

if TYPE_CHECKING:
    import torch


def reduce_tensor(link: Link, tensor: torch.Tensor, root: int, op: ReduceOp) -> None:
    """Reduce into ``tensor`` on the root.  Other ranks' tensors are left unchanged.

    Children are combined in a fixed order, so a given world size always rounds the same way.
    """
    size = link.size
    vrank = (link.rank - root) % size
    parent, children = binomial_parent_children(vrank, size)
    acc = tensor if link.rank == root else tensor.clone()
    for child in reversed(children):
        src = (child + root) % size
        other = link.decode_tensor(link.recv(src), src)
        if other.shape != acc.shape:
            raise RemoteProtocolError(
                f"{link.deadline.op}: rank {src} sent a block that does not match this rank's "
                f"tensor {tuple(acc.shape)} {acc.dtype}"
            )
        combine_(acc, other.to(acc.dtype), op)
    if parent is not None:
        link.send((parent + root) % size, encode(acc))
    else:
        finish_(acc, op, size)


def allreduce_tensor(
    link: Link, tensor: torch.Tensor, op: ReduceOp, into: memoryview | None = None
) -> None:
    """Reduce to rank 0, then broadcast: every rank ends with bit-identical values.

    ``into``: a byte view of ``tensor``, where the result may land without a copy.
    """
    reduce_tensor(link, tensor, 0, op)
    msg = broadcast(link, encode(tensor) if link.rank == 0 else None, 0, into=into)
    if link.rank != 0:
        result = link.decode_tensor(msg, 0)
        if result.shape != tensor.shape or result.dtype != tensor.dtype:
            raise RemoteProtocolError(
                f"{link.deadline.op}: rank 0 broadcast a {result.dtype} {tuple(result.shape)} "
                f"result for this rank's {tensor.dtype} {tuple(tensor.shape)}"
            )
        if result.data_ptr() != tensor.data_ptr() or result.device != tensor.device:
            tensor.copy_(result)
