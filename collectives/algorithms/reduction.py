"""Binomial-tree reduce and reduce-then-broadcast allreduce on tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from collectives.algorithms.link import Link, binomial_parent_children
from collectives.algorithms.rooted import broadcast
from collectives.codec import decode, encode
from collectives.errors import RemoteProtocolError
from collectives.reduce_op import ReduceOp, combine_, finish_

if TYPE_CHECKING:
    import torch


def reduce_tensor(link: Link, tensor: torch.Tensor, root: int, op: ReduceOp) -> None:
    """Reduce into ``tensor`` on the root.  Other ranks' tensors are left unchanged.

    Children are combined in a fixed order, so a given world size always rounds the same way.
    """
    import torch

    size = link.size
    vrank = (link.rank - root) % size
    parent, children = binomial_parent_children(vrank, size)
    acc = tensor if link.rank == root else tensor.clone()
    for child in reversed(children):
        msg = link.recv((child + root) % size)
        other = decode(msg.header, msg.buffers)
        if not isinstance(other, torch.Tensor) or other.shape != acc.shape:
            raise RemoteProtocolError(
                f"{link.deadline.op}: rank {(child + root) % size} sent a block that does not "
                f"match this rank's tensor {tuple(acc.shape)} {acc.dtype}"
            )
        combine_(acc, other.to(acc.dtype), op)
    if parent is not None:
        link.send((parent + root) % size, encode(acc))
    else:
        finish_(acc, op, size)


def allreduce_tensor(link: Link, tensor: torch.Tensor, op: ReduceOp) -> None:
    """Reduce to rank 0, then broadcast: every rank ends with bit-identical values."""
    import torch

    reduce_tensor(link, tensor, 0, op)
    msg = broadcast(link, encode(tensor) if link.rank == 0 else None, 0)
    if link.rank != 0:
        result = decode(msg.header, msg.buffers)
        assert isinstance(result, torch.Tensor)
        tensor.copy_(result.view(tensor.shape))
