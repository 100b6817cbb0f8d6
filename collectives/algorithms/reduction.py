"""Reduce and allreduce of tensors: trees and recursive doubling for small tensors, the ring
(:mod:`~collectives.algorithms.ring_reduce`) for large ones (a reduce keeps its tree in worlds
of up to :data:`TREE_MAX_RANKS` ranks).

Every result is bit-identical on every rank, for every :class:`ReduceOp` and dtype, because each
element is reduced along one fixed tree of ranks that does not depend on who computes it:

* tree reduce: a node combines its own value with its children's, in a fixed child order (a
  non-root folds its own values into its first child's partial, the root its children's
  partials into its own values: the result is only the root's);
* recursive doubling: both partners of a round compute ``(lower half's value) op (upper half's
  value)`` from the same two operands, so they hold the same bytes after every round (the
  operand order is fixed even for ops that commute, so NaN payloads and signed zeros agree too);
* the ring: see :mod:`~collectives.algorithms.ring_reduce`.

AVG sums along the same tree and divides once (``finish_``) the identical sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collectives.algorithms import ring_reduce
from collectives.algorithms.blocks import recv_tensor, tensor_bytes_or_none
from collectives.algorithms.link import Link, binomial_parent_children, offers
from collectives.algorithms.scratch import partial_buffer
from collectives.codec import encode
from collectives.reduce_op import ReduceOp, combine_, finish_

if TYPE_CHECKING:
    import torch

TREE_MAX_RANKS = 4
"""Worlds up to this size reduce large tensors up the tree too (see :func:`reduce_tensor`)."""


def reduce_tensor(link: Link, tensor: torch.Tensor, root: int, op: ReduceOp) -> None:
    """Reduce into ``tensor`` on the root.  Other ranks' tensors are left unchanged.

    Up a binomial tree (log2(size) steps, the root combines log2(size) whole tensors), unless
    the tensor is large and the world has more than :data:`TREE_MAX_RANKS` ranks: then it is
    reduce-scattered on the ring and gathered to the root, so no rank receives more than about
    two tensors' worth.  The tree moves the fewest bytes (each rank's tensor once) in the fewest
    hops; the ring balances what each rank receives.  On one host every byte copied costs the
    same memory bus, so fewer bytes win: 16 MiB float32 on udp (same-host copies, 2 cores),
    medians of the root's time, tree against ring: 2 ranks 1.6 against 2.6-3.0 ms, 4 ranks
    6.3-7.1 against 9.9-11.1 ms, 8 ranks 17-21 against 40-45 ms.  Between hosts the root's link
    is the limit, and there the tree's log2(size) tensors into the root cost more than the
    ring's 2(size-1)/size from 8 ranks on (3 against 1.75): hence the bound.
    """
    size = link.size
    if size > TREE_MAX_RANKS and ring_reduce.use_ring(_nbytes(tensor), size):
        ring_reduce.reduce(link, tensor, root, op)
        return
    vrank = (link.rank - root) % size
    parent, children = binomial_parent_children(vrank, size)
    own = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = own.view(-1)
    # The children's partials are received into scratch memory (:mod:`.scratch`), the first
    # one combined with this rank's values there (its own tensor stays unchanged), the next
    # ones into it; the root combines into its own tensor.  With two children at most (worlds
    # of up to 4 ranks) each has a slot of its own, offered before any wait: the child not
    # waited for yet lands in its slot instead of a pool buffer (fresh memory, the first time,
    # and a copy after).
    acc = flat if parent is None else None
    srcs = [(child + root) % size for child in reversed(children)]
    reuse = ring_reduce.sends_copies(link)
    slots = [partial_buffer(min(i, 1), flat.numel(), flat, reuse=reuse) for i in range(len(srcs))]
    into: list[memoryview | None] | None = None
    if 1 < len(srcs) <= 2:
        into = [None] * size
        for src, slot in zip(srcs, slots, strict=True):
            into[src] = tensor_bytes_or_none(slot)
    with offers(link, srcs, into):
        for src, other in zip(srcs, slots, strict=True):
            recv_tensor(link, src, other)
            if acc is None:
                combine_(other, flat, op)  # the child's subtree first, then this rank's values
                acc = other
            else:
                combine_(acc, other, op)
    if parent is not None:
        out = own if acc is None else acc  # a leaf sends its own values
        if out is tensor and not ring_reduce.sends_copies(link):
            out = out.clone()  # a link that sends by reference must not lend the caller's tensor
        link.send((parent + root) % size, encode(out))
        return
    finish_(own, op, size)
    if own is not tensor:
        tensor.copy_(own)


def allreduce_tensor(
    link: Link, tensor: torch.Tensor, op: ReduceOp, into: memoryview | None = None
) -> None:
    """Reduce ``tensor`` over every rank, in place; every rank ends with identical bytes.

    Large tensors: ring reduce-scatter + allgather (each rank moves 2(size-1)/size of the
    tensor each way).  Small ones: recursive doubling (ceil(log2(size)) + 2 steps at most).
    ``into`` (a byte view of ``tensor``) is accepted for the callers' sake; the blocks find
    their own places in ``tensor``.
    """
    del into
    if link.size == 1:
        finish_(tensor, op, 1)
    elif ring_reduce.use_ring(_nbytes(tensor), link.size):
        ring_reduce.allreduce(link, tensor, op)
    else:
        _recursive_doubling(link, tensor, op)


def _recursive_doubling(link: Link, tensor: torch.Tensor, op: ReduceOp) -> None:
    """Recursive doubling over the largest power of two ``pof2`` <= size.

    The ``rem = size - pof2`` extra ranks fold in first: among ranks ``0 .. 2*rem-1``, even rank
    ``r`` hands its value to ``r + 1`` (which combines ``x[r] op x[r+1]``) and sits out, then
    gets the result back at the end.  Nothing sent is written afterwards: each combine makes a
    new tensor.
    """
    rank, size = link.rank, link.size
    pof2 = 1 << (size.bit_length() - 1)
    rem = size - pof2
    if rank < 2 * rem and rank % 2 == 0:
        link.send(rank + 1, encode(tensor.clone()))  # ``tensor`` gets the result below
        recv_tensor(link, rank + 1, tensor)
        return
    value = tensor
    if rank < 2 * rem:
        value = combined(_recv_like(link, rank - 1, tensor), tensor, op)
        vrank = rank // 2
    else:
        vrank = rank - rem
    mask = 1
    while mask < pof2:
        partner_v = vrank ^ mask
        partner = 2 * partner_v + 1 if partner_v < rem else partner_v + rem
        link.send(partner, encode(value if value is not tensor else tensor.clone()))
        other = _recv_like(link, partner, tensor)
        value = combined(value, other, op) if vrank < partner_v else combined(other, value, op)
        mask <<= 1
    finish_(value, op, size)  # ``value`` is the last combine's new tensor: not sent yet
    tensor.copy_(value)
    if rank < 2 * rem:
        link.send(rank - 1, encode(value))


def _recv_like(link: Link, src: int, like: torch.Tensor) -> torch.Tensor:
    import torch

    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    recv_tensor(link, src, out)
    return out


def combined(lower: torch.Tensor, upper: torch.Tensor, op: ReduceOp) -> torch.Tensor:
    """``lower op upper`` as a new tensor (neither operand is written)."""
    out = lower.clone()
    combine_(out, upper, op)
    return out


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
