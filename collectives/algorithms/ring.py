"""Ring allgather: every rank sends and receives size - 1 blocks; no rank is a hot spot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from collectives.algorithms.link import Link, sendrecv

if TYPE_CHECKING:
    from collectives.codec import Encoded


def allgather(
    link: Link, msg: Encoded, into: Sequence[memoryview | None] | None = None
) -> list[Encoded]:
    """``into[r]``: where rank ``r``'s block may land (see :class:`Link`)."""
    size, rank = link.size, link.rank
    out: list[Encoded | None] = [None] * size
    out[rank] = msg
    right, left = (rank + 1) % size, (rank - 1) % size
    block = rank
    for _ in range(size - 1):
        current = out[block]
        assert current is not None
        block = (block - 1) % size
        out[block] = sendrecv(link, right, current, left, None if into is None else into[block])
    return [m for m in out if m is not None]
