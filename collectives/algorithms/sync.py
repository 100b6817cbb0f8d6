"""Dissemination barrier: ceil(log2(size)) rounds, no coordinator."""

from __future__ import annotations

from collectives.algorithms.link import Link
from collectives.codec import encode


def barrier(link: Link) -> None:
    token = encode(b"")
    distance = 1
    while distance < link.size:
        link.send((link.rank + distance) % link.size, token)
        link.recv((link.rank - distance) % link.size)
        distance <<= 1
