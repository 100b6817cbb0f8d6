"""Rooted collectives: binomial-tree broadcast, direct gather and scatter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from collectives.algorithms.link import Link, binomial_parent_children

if TYPE_CHECKING:
    from collectives.codec import Encoded


def broadcast(
    link: Link, msg: Encoded | None, root: int, into: memoryview | None = None
) -> Encoded:
    """Binomial tree: the root sends log2(size) messages, never size - 1 in a row.

    ``into``: where a non-root's copy may land (see :class:`Link`); it is forwarded from there.
    """
    size = link.size
    vrank = (link.rank - root) % size
    parent, children = binomial_parent_children(vrank, size)
    if parent is not None:
        msg = link.recv((parent + root) % size, into)
    assert msg is not None, "the root must provide the message"
    for child in children:
        link.send((child + root) % size, msg)
    return msg


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
    for dst in range(link.size):
        if dst != root:
            link.send(dst, msgs[dst])
    return msgs[root]


def _collect(
    link: Link,
    pending: list[int],
    out: list[Encoded | None],
    into: Sequence[memoryview | None] | None,
) -> None:
    """Receive one message from each pending rank, taking whichever has arrived first.

    Serving arrivals in any order keeps a slow rank from delaying the copy-out of fast ones; on
    timeout the error names every rank still silent, not just the first one waited for.
    """
    from collectives.errors import CollectiveTimeoutError

    while pending:
        ready = [r for r in pending if link.has_message(r)]
        src = ready[0] if ready else pending[0]
        try:
            out[src] = link.recv(src, None if into is None else into[src])
        except CollectiveTimeoutError:
            silent = [r for r in pending if not link.has_message(r)]
            raise link.deadline.error(silent or [src]) from None
        pending.remove(src)
