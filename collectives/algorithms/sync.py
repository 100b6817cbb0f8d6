"""Dissemination: ceil(log2(size)) rounds, no coordinator (the barrier, and the agreement of a
rooted collective's envelope in :mod:`collectives.backends.p2p`)."""

from __future__ import annotations

from collections.abc import Iterator

from collectives.algorithms.link import Link
from collectives.codec import encode

TOKEN = encode(b"")
"""The empty message each round sends."""


def dissemination(rank: int, size: int) -> Iterator[tuple[int, int]]:
    """The rounds of a dissemination exchange as (send to, receive from): round ``k`` sends to
    ``rank + 2**k`` and receives from ``rank - 2**k``.  After the last, every rank has heard
    (transitively) from every other."""
    distance = 1
    while distance < size:
        yield (rank + distance) % size, (rank - distance) % size
        distance <<= 1


def barrier(link: Link) -> None:
    for dst, src in dissemination(link.rank, link.size):
        link.send(dst, TOKEN)
        link.recv(src)
