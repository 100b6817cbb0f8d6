"""Rooted collectives: broadcast (binomial tree, or :mod:`.large_broadcast` for large messages),
direct gather and scatter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from collectives.algorithms import large_broadcast
from collectives.algorithms.link import Link, binomial_parent_children, offers, send_each

if TYPE_CHECKING:
    from collectives.codec import Encoded


def broadcast(
    link: Link, msg: Encoded | None, root: int, into: memoryview | None = None
) -> Encoded:
    """The root's ``msg`` on every rank.

    Below :data:`~.large_broadcast.HEAD_BYTES` (or in a world of up to
    :data:`~.large_broadcast.TREE_MAX_RANKS` ranks) the message goes whole down a binomial tree:
    log2(size) sequential hops, the root sends log2(size) copies.  Larger ones take
    :mod:`~.large_broadcast`: the root sends about two copies whatever the world size.

    ``into``: where a non-root's payload may land (see :class:`Link`); it is forwarded from
    there.  It is offered to the first receive whenever that receive is the whole message: with
    two ranks (never the large path) or when only a small message could fit it, so a large
    broadcast's head never lands in the caller's buffer.  Not offering it at two ranks cost a
    fresh allocation per broadcast (a page fault per 4 KiB written, then a copy into the
    caller's tensor): on the udp backend a 128 MiB 2-rank broadcast cost the receiver 129 ms of
    CPU, 34 ms once it lands in place.
    """
    size = link.size
    vrank = (link.rank - root) % size
    parent, children = binomial_parent_children(vrank, size)
    targets = [(child + root) % size for child in children]
    if parent is None:
        assert msg is not None, "the root must provide the message"
        if large_broadcast.is_large(msg.nbytes, size):
            large_broadcast.send_from_root(link, msg, root, targets)
            return msg
        send_each(link, [(dst, msg) for dst in targets])
        return msg
    src = (parent + root) % size
    whole = into is not None and (
        size <= large_broadcast.TREE_MAX_RANKS or into.nbytes < large_broadcast.HEAD_BYTES
    )
    first = link.recv(src, into if whole else None)
    send_each(link, [(dst, first) for dst in targets])  # the whole message, or a large one's head
    if large_broadcast.is_large(first.nbytes, size):
        return large_broadcast.receive(link, first, src, root, into)
    return first


def gather(
    link: Link, msg: Encoded, root: int, into: Sequence[memoryview | None] | None = None
) -> list[Encoded] | None:
    """``into[r]`` (root only): where rank ``r``'s block may land."""
    if link.rank != root:
        link.send(root, msg)
        return None
    out: list[Encoded | None] = [None] * link.size
    out[root] = msg
    pending = [r for r in range(link.size) if r != root]
    _collect(link, pending, out, into)
    return [m for m in out if m is not None]


def scatter(
    link: Link, msgs: list[Encoded] | None, root: int, into: memoryview | None = None
) -> Encoded:
    if link.rank != root:
        return link.recv(root, into)
    assert msgs is not None and len(msgs) == link.size
    # Each block is posted to its own rank only, nearest first after the root (the order every
    # rank's own turn comes in a ring of ranks), with no fence between them: the posts are eager.
    order = [(root + k) % link.size for k in range(1, link.size)]
    send_each(link, [(dst, msgs[dst]) for dst in order])
    return msgs[root]


def _collect(
    link: Link,
    pending: list[int],
    out: list[Encoded | None],
    into: Sequence[memoryview | None] | None,
) -> None:
    """Receive one message from each pending rank, taking whichever has arrived first.

    Serving arrivals in any order keeps a slow rank from delaying the copy-out of fast ones; on
    timeout the error names every rank still silent, not just the first one waited for.  Every
    pending rank's buffer is offered first where the link can (see :class:`Link`): the peers
    send at once, and a body that arrives while another is waited for lands in its place (on
    udp a 4-rank 128 MiB gather copied about half of its bodies out of pool buffers).
    """
    from collectives.errors import CollectiveTimeoutError

    with offers(link, pending, into):
        while pending:
            ready = [r for r in pending if link.has_message(r)]
            src = ready[0] if ready else pending[0]
            try:
                out[src] = link.recv(src, None if into is None else into[src])
            except CollectiveTimeoutError:
                silent = [r for r in pending if not link.has_message(r)]
                raise link.deadline.error(silent or [src]) from None
            pending.remove(src)
