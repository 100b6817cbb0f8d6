"""The shapes in which the arena (``udp_arena``) combines a reduction, and when a one-host world
reduces a large tensor on the trees instead of the ring.

Each shape is the message path's own (``algorithms.reduction``): recursive doubling for an
allreduce, the binomial tree for a reduce, with the same order and operand sides, so the arena
and the message path give the same bits (in floating point the shape decides the rounding).
A ``step`` does the combining, so the caller decides where each step's result goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from collectives.algorithms.link import binomial_parent_children
from collectives.algorithms.reduction import TREE_MAX_RANKS
from collectives.algorithms.ring_reduce import use_ring

if TYPE_CHECKING:
    import torch

Step = Callable[["torch.Tensor", "torch.Tensor", bool], "torch.Tensor"]
"""``step(lower, upper, last)``: ``lower op upper``, as a tensor that neither is (the reduction's
last step, ``last``, may write the caller's tensor: every other read of it is done)."""


def doubling(parts: list[torch.Tensor], step: Step) -> torch.Tensor:
    """``parts`` (in rank order) combined as ``reduction._recursive_doubling`` does: the first
    ``2 * rem`` fold in pairs, then the ``2**m`` values pair up level by level, lower op upper.
    One part: that part."""
    pof2 = 1 << (len(parts).bit_length() - 1)
    rem = len(parts) - pof2
    # Never the last step: pof2 >= 2 values remain after these.
    values = [step(parts[2 * i], parts[2 * i + 1], False) for i in range(rem)]
    values += parts[2 * rem :]
    while len(values) > 1:
        last = len(values) == 2
        values = [step(values[i], values[i + 1], last) for i in range(0, len(values), 2)]
    return values[0]


def tree(parts: list[torch.Tensor], root: int, step: Step) -> torch.Tensor:
    """``parts`` (in rank order) combined up the binomial tree rooted at ``root``, as
    ``reduction.reduce_tensor`` does: a rank's children's partials in send order, the first
    combined as (child op own) and the next into it, except at the root, which folds them
    into its own values (own op child)."""
    size = len(parts)

    def value(vrank: int) -> torch.Tensor:
        own = parts[(vrank + root) % size]
        children = list(reversed(binomial_parent_children(vrank, size)[1]))
        if not children:
            return own
        if vrank == 0:
            acc = own
            for i, child in enumerate(children):
                acc = step(acc, value(child), i == len(children) - 1)
            return acc
        acc = step(value(children[0]), own, False)
        for child in children[1:]:
            acc = step(acc, value(child), False)
        return acc

    return value(0)


def tree_allreduce(nbytes: int, size: int) -> bool:
    """Whether a one-host world allreduces ``nbytes`` as a tree reduce to rank 0 and a tree
    broadcast back, not on the ring (decided alike on every rank: sizes only).  Both move the
    same bytes in all (each rank's tensor up once, the result down once, against 2(size-1)/size
    of it each way per rank on the ring), and between hosts the ring's balance wins; on one
    host every copy loads the same memory bus, and the ring's 2(size-1) steps cost more CPU:
    4 ranks on 2 cores, 16 MiB float32, back to back, ring 17-20 ms (9 ms of CPU per rank),
    reduce and broadcast 4 + 4 ms.  Worlds the tree reduce serves (``TREE_MAX_RANKS``), tensors
    the message path would put on the ring."""
    return size <= TREE_MAX_RANKS and use_ring(nbytes, size)


__all__ = ["Step", "doubling", "tree", "tree_allreduce"]
