"""The point-to-point surface the shared algorithms need from a backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
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
    """

    rank: int
    size: int
    deadline: Deadline
    codec: CodecOptions

    def send(self, dst: int, msg: Encoded) -> None: ...

    def recv(self, src: int, into: memoryview | None = None) -> Encoded: ...

    def has_message(self, src: int) -> bool: ...

    def decode_tensor(self, msg: Encoded, src: int) -> torch.Tensor: ...


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
