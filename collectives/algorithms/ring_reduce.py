"""Ring reduce-scatter and ring allgather of a tensor's blocks: the bandwidth-optimal allreduce
(each rank sends and receives 2(size-1)/size of the tensor) and the large-message reduce.

Blocks.  The tensor, flattened, is cut into ``size`` blocks of nearly equal element counts
(:func:`~collectives.algorithms.blocks.split`); rank ``r`` ends the reduce-scatter owning the
fully reduced block ``r``.

Why every rank ends with the same bytes.  Block ``b`` is reduced along one chain: rank ``b+1``
sends its own values, each next rank combines *received partial (op) own values* and passes the
result on, and rank ``b`` combines last.  So every element of block ``b`` is
``((x[b+1] op x[b+2]) op ...) op x[b]``, computed once, on rank ``b``; the allgather then only
copies those bytes.  The order depends on the element's block and the world size, never on the
rank that reads the result, so floating-point sums are bit-identical everywhere (they may differ
in the last bit from another algorithm's order, as any reduction order may).

Memory.  A link that is done with a message when ``send`` returns (``send_copies``: the P2P seam,
whose posts copy or seal the bytes) needs no private copy of the first block sent, and an
allreduce (and a reduce's root) receives every partial into the storage of a block whose own
values it no longer reads (the result overwrites it last): the first into the block it sent
first, each later one into the block it combined at the step before.  That one is not being
sent, so it is offered before the send (:func:`~collectives.algorithms.link.sendrecv`) and the
peer's partial lands there meanwhile; a 4-rank 128 MiB allreduce on udp copied three 32 MiB
partials per rank and op out of pool buffers before.  No fresh buffer per op either (unless a
block is shorter than the partial, by the one element of an uneven split).  A rank whose tensor
must stay unchanged (a reduce's non-root) receives its partials into per-thread scratch memory
(:mod:`.scratch`) on such a link, not a fresh buffer per step.  Blocks over
~32 MiB come from fresh ``mmap`` memory, a page fault per 4 KiB written: a 128 MiB allreduce
at 2 ranks took 32,800 faults per rank and op, 1,100 after (with the sender's recycled frames,
CPU per op 262 -> 138 ms on the udp backend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collectives.algorithms.blocks import recv_tensor, split
from collectives.algorithms.scratch import partial_buffer
from collectives.codec import encode
from collectives.reduce_op import ReduceOp, combine_, finish_

if TYPE_CHECKING:
    import torch

    from collectives.algorithms.link import Link

RING_MIN_BYTES = 256 << 10
"""Tensors from this size up reduce on the ring; smaller ones by recursive doubling."""
RING_MIN_BLOCK_BYTES = 4 << 10
"""...provided each ring step still moves this much: a ring takes 2(size-1) steps, and below a
few KiB per step their latency costs more than the bandwidth the ring saves."""


def use_ring(nbytes: int, size: int) -> bool:
    """Whether a reduction of ``nbytes`` over ``size`` ranks runs on the ring (every rank
    decides alike: the tensors of a collective have the same size everywhere)."""
    return size > 1 and nbytes >= max(RING_MIN_BYTES, size * RING_MIN_BLOCK_BYTES)


def sends_copies(link: Link) -> bool:
    """Whether ``link.send`` is done with the message's buffers when it returns (``send_copies``
    set on the link; a link without the attribute may send by reference)."""
    return getattr(link, "send_copies", False) is True


def reduce_scatter(
    link: Link, flat: torch.Tensor, op: ReduceOp, *, scratch: bool = False
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The blocks of ``flat`` (1-d) and this rank's block reduced over every rank and finished
    (AVG divided).  ``flat`` is read only unless ``scratch`` (an allreduce, which overwrites
    every block afterwards) and the link sends copies: then each partial is received into the
    storage of a block this rank no longer reads, and the result lives there too (see the
    module docstring).  Otherwise, on a link that sends copies, partials live in this thread's
    scratch memory (:mod:`.scratch`): the result is valid until its next reduction."""
    size, rank = link.size, link.rank
    assert size > 1, "a ring needs two ranks"
    parts = split(flat.numel(), size)
    right, left = (rank + 1) % size, (rank - 1) % size
    start, stop = parts[(rank - 1) % size]
    copies = sends_copies(link)
    reuse = copies and scratch
    # Else a copy: the caller may overwrite its blocks (allreduce lands results in them) while
    # this message may still be sent by reference.
    outgoing = encode(flat[start:stop] if copies else flat[start:stop].clone())
    spare = flat[start:stop] if reuse else None  # sent by the time the first partial lands
    for step in range(size - 1):
        start, stop = parts[(rank - step - 2) % size]
        if spare is not None and spare.numel() >= stop - start:
            partial = spare[: stop - start]
        else:  # scratch where sent when send returns: reused by this thread's next reduction
            partial = partial_buffer(step % 2, stop - start, flat, reuse=copies)
        if step == 0 and reuse:
            # ``partial`` is the block being sent: it may take the peer's only once sent.
            link.send(right, outgoing)
            recv_tensor(link, left, partial)
        else:
            # The previous step's partial goes with this step's buffer offered first (another
            # one), so the peer's partial lands in it while this rank still sends.
            recv_tensor(link, left, partial, send=(right, outgoing))
        combine_(partial, flat[start:stop], op)
        if reuse:
            spare = flat[start:stop]  # this block's own values are never read again
        outgoing = encode(partial)  # (not sent after the last step)
    finish_(partial, op, size)
    return parts, partial


def allgather_blocks(
    link: Link, flat: torch.Tensor, parts: list[tuple[int, int]], mine: torch.Tensor
) -> None:
    """Every rank's reduced block into ``flat`` (1-d, this rank's own block is ``mine``)."""
    size, rank = link.size, link.rank
    right, left = (rank + 1) % size, (rank - 1) % size
    start, stop = parts[rank]
    flat[start:stop].copy_(mine)
    for step in range(size - 1):
        start, stop = parts[(rank - step) % size]
        block = encode(flat[start:stop])  # written once already, never again
        start, stop = parts[(rank - step - 1) % size]
        recv_tensor(link, left, flat[start:stop], send=(right, block))


def allreduce(link: Link, tensor: torch.Tensor, op: ReduceOp) -> None:
    """Reduce-scatter then allgather, in place in ``tensor``."""
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = work.view(-1)
    parts, mine = reduce_scatter(link, flat, op, scratch=True)
    allgather_blocks(link, flat, parts, mine)
    if work is not tensor:
        tensor.copy_(work)


def reduce(link: Link, tensor: torch.Tensor, root: int, op: ReduceOp) -> None:
    """Reduce-scatter, then every rank sends its block to ``root`` (direct, into place).  The
    root sends and receives about one tensor, every other rank about two."""
    source = tensor if tensor.is_contiguous() else tensor.contiguous()
    # The root's tensor becomes the result, every block of it written below (its own block
    # first, from ``mine``): scratch, like an allreduce's.  The others' stay unchanged.
    parts, mine = reduce_scatter(link, source.view(-1), op, scratch=link.rank == root)
    if link.rank != root:
        link.send(root, encode(mine))
        return
    work = source  # the caller's tensor, or already a private contiguous copy of it
    flat = work.view(-1)
    for k in range(link.size):
        src = (root + k) % link.size
        start, stop = parts[src]
        if src == root:
            flat[start:stop].copy_(mine)
        else:
            recv_tensor(link, src, flat[start:stop])
    if work is not tensor:
        tensor.copy_(work)
