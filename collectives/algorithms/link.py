"""The point-to-point surface the shared algorithms need from a backend."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import torch

    from collectives.codec import CodecOptions, Encoded
    from collectives.deadline import Deadline


class Link(Protocol):
    """Messages of one collective operation, between this rank and any other.

    ``recv`` blocks until the operation's deadline and raises ``CollectiveTimeoutError`` naming
    the peer, or ``CollectiveMismatchError`` when the peer's next message belongs to another op.
    ``into`` is a byte view of where the caller wants the payload (see
    :meth:`collectives.backends.p2p.P2PBackend._take`): the message returned may or may not live
    there, so callers still place it.  ``decode_tensor`` decodes a received block with the
    backend's codec options, refusing anything but a tensor before decoding.  ``has_message``
    lets an algorithm name *every* silent rank in its timeout error.  ``codec``: this rank's
    decoding options, whose limits a receiver holds an announced size to before allocating.

    ``send`` may keep a reference to the message's buffers until the collective ends (the
    torch link sends by reference), so the algorithms never write a buffer they have sent.  A
    link whose ``send`` is done with the buffers when it returns (it copied or sealed them) says
    so with a ``send_copies = True`` attribute, optional: the ring reduction then reuses them.

    A link that can land a message that arrives before its ``recv`` is called (a transport
    that receives in the background) may have an ``offer(src, into)`` method, optional: it
    offers ``into`` to the next message from ``src`` and returns a callable that withdraws
    the offer, or None when it made none.  :func:`offer_to` calls it (for :func:`sendrecv` and the
    gather).

    A link may have a ``send_each(posts)`` method, optional: ``send`` of each ``(dst, msg)`` in
    order, done when it returns, but free to overlap them (a udp post to a rank of the same host
    waits for that rank to copy the body: one wait for all, not one after the other).
    :func:`send_each` calls it where it exists (the fan-outs of the rooted collectives).
    """

    rank: int
    size: int
    deadline: Deadline
    codec: CodecOptions

    def send(self, dst: int, msg: Encoded) -> None: ...

    def recv(self, src: int, into: memoryview | None = None) -> Encoded: ...

    def has_message(self, src: int) -> bool: ...

    def decode_tensor(self, msg: Encoded, src: int) -> torch.Tensor: ...


def offer_to(link: Link, src: int, into: memoryview | None) -> Callable[[], None] | None:
    """Offer ``into`` to the next message from ``src`` where the link can (its optional
    ``offer``, see :class:`Link`); what withdraws the offer, or None when none was made."""
    offer = getattr(link, "offer", None)
    return offer(src, into) if offer is not None and into is not None else None


@contextlib.contextmanager
def offers(
    link: Link, srcs: Sequence[int], into: Sequence[memoryview | None] | None
) -> Iterator[None]:
    """Offer ``into[src]`` to the next message of each of ``srcs`` (:func:`offer_to`) for the
    block's receives, which pass the same buffers; when it ends, withdraw every offer: a receive
    uses its own up, and one a failed op left must not catch a later op's message."""
    withdraws: list[Callable[[], None] | None] = []
    try:
        for src in srcs:
            withdraws.append(offer_to(link, src, None if into is None else into[src]))
        yield
    finally:
        for withdraw in withdraws:
            if withdraw is not None:
                withdraw()


def send_each(link: Link, posts: Sequence[tuple[int, Encoded]]) -> None:
    """``link.send(dst, msg)`` for each of ``posts``, overlapped where the link can (its
    optional ``send_each``, see :class:`Link`)."""
    many = getattr(link, "send_each", None)
    if many is not None:
        many(posts)
        return
    for dst, msg in posts:
        link.send(dst, msg)


def sendrecv(
    link: Link, dst: int, msg: Encoded, src: int, into: memoryview | None = None
) -> Encoded:
    """``link.send(dst, msg)`` then ``link.recv(src, into)``, as MPI_Sendrecv: a ring step.

    The receive's buffer is offered first where the link can (see :class:`Link`): a send
    returns when the transport has taken the message, which for a large block is most of its
    transfer, and meanwhile the peer's block arrives.  Without the offer it went to a pool
    buffer and was copied into ``into`` afterwards (on udp, a 4-rank 128 MiB broadcast's ring
    copied two 32 MiB blocks per rank and op that way)."""
    withdraw = offer_to(link, src, into)
    try:
        link.send(dst, msg)
    except BaseException:
        if withdraw is not None:
            withdraw()  # no recv takes it: a later op's message must not land in ``into``
        raise
    return link.recv(src, into)


def binomial_parent_children(vrank: int, size: int) -> tuple[int | None, list[int]]:
    """Parent and children (in send order) of ``vrank`` in a binomial tree rooted at 0.

    A node's parent is itself with its lowest set bit cleared; its children are ``vrank + 2**k``
    for each ``2**k`` below that bit.  Depth is ceil(log2(size)), and the root's biggest subtree
    is served first so that the longest chain starts earliest.
    """
    parent: int | None = None
    mask = 1
    while mask < size:
        if vrank & mask:
            parent = vrank - mask
            break
        mask <<= 1
    children = []
    mask >>= 1
    while mask > 0:
        child = vrank + mask
        if child < size:
            children.append(child)
        mask >>= 1
    return parent, children
