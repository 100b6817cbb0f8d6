"""Broadcast of a large message: a fixed-size head down the binomial tree, then the rest as a
scatter plus a ring allgather (van de Geijn), so the root sends about two copies, not log2(size).

The stream.  The root's message (any :class:`~collectives.codec.Encoded`: a tensor, or an object
with a header and many buffers) is sent as one byte stream: an 8-byte little-endian frame length
``F``, then the frame (the codec header followed by every buffer, as :func:`~collectives.codec.pack`
lays it out, without building it).  The first :data:`HEAD_BYTES` of the stream are the *head*;
the rest, the *tail*, is cut into ``size`` blocks, block ``v`` for the rank ``v`` places after
the root.

Why a head of exactly :data:`HEAD_BYTES`.  A non-root does not know the size of what is coming, so
it cannot choose the algorithm itself; the first message it gets down the tree has to tell it.
A message shorter than :data:`HEAD_BYTES` travels whole down the tree (the small broadcast), and
a head is never shorter than that, so ``nbytes`` of the first message alone tells the two apart,
for every payload a user can send, with nothing added to a small broadcast.  The head is payload
too (the root sends it to log2(size) children, bounded by the constant, not by the message).

The moves, in the order each rank posts them (one channel per pair of ranks is FIFO, so each
receiver takes them in this order):

1. every rank forwards the head to its tree children as soon as it has it;
2. the root sends tail block ``v`` to rank ``v`` (the scatter, (size-1)/size of the tail);
3. ring allgather of the blocks: at step ``s`` rank ``v`` sends block ``v - s`` to ``v + 1``
   and receives block ``v - s - 1`` from ``v - 1``.  The root holds every block, so it sends
   from its own copy and receives nothing, and the rank before it sends it nothing.

A receiver lands the tail in place: straight into the caller's ``into`` buffer when the root's
header says the payload is one uncompressed buffer of exactly that size (``broadcast_into``),
else into one frame buffer it allocates after holding ``F`` to its codec limits; the frame is
then split by :func:`~collectives.codec.unpack`, which checks the header like any receive.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from collectives.algorithms.blocks import (
    block_size,
    bytes_message,
    recv_bytes,
    split,
)
from collectives.algorithms.link import send_each
from collectives.codec import Encoded, alloc_buffer, header_length, header_limit, unpack
from collectives.codec.frames import CODEC_NONE, FIXED_PREFIX, Header, Kind
from collectives.errors import CodecError, RemoteProtocolError

if TYPE_CHECKING:
    from collectives.algorithms.link import Link

HEAD_BYTES = 256 << 10
"""A broadcast of at least this many bytes (header included) in a world of more than
:data:`TREE_MAX_RANKS` ranks takes the large path; its head is exactly this long."""
TREE_MAX_RANKS = 4
"""Worlds up to this size send every broadcast whole down the binomial tree.  Its root sends
ceil(log2(size)) copies, at most two here, where the large path's sends 2(size-1)/size (1.33 at
3 ranks, 1.5 at 4), and it takes log2(size) hops where the large path takes the head's, the
scatter and size - 1 ring steps.  On one host, where ranks copy bodies out of each other's
memory, the hops are what counts: 4 ranks on udp (2 cores), medians, tree against the large
path: 1 MiB 1.8-2.2 against 3.7 ms, 16 MiB 6.0-6.3 against 8.3-9.2 ms, 128 MiB 24-31 against
35-36 ms."""

_LENGTH = struct.Struct("<Q")


def is_large(nbytes: int, size: int) -> bool:
    """Whether a broadcast whose first message is ``nbytes`` long takes the large path (never
    with up to :data:`TREE_MAX_RANKS` ranks)."""
    return size > TREE_MAX_RANKS and nbytes >= HEAD_BYTES


def send_from_root(link: Link, msg: Encoded, root: int, children: list[int]) -> None:
    """The root's side: head to ``children`` (ranks), then the scatter and its ring sends."""
    size = link.size
    stream = _Stream([_LENGTH.pack(msg.nbytes) + bytes(msg.header), *msg.buffers])
    head = bytes_message(stream.take(0, HEAD_BYTES))
    send_each(link, [(dst, head) for dst in children])
    tail = split(stream.total - HEAD_BYTES, size)
    blocks = [
        bytes_message(stream.take(HEAD_BYTES + start, HEAD_BYTES + stop)) for start, stop in tail
    ]
    send_each(link, [((v + root) % size, blocks[v]) for v in range(1, size)])
    right = (root + 1) % size
    for s in range(size - 1):
        link.send(right, blocks[-s % size])


def receive(link: Link, head: Encoded, src: int, root: int, into: memoryview | None) -> Encoded:
    """A non-root's side, once it has the ``head`` (from ``src``) and forwarded it."""
    size = link.size
    vrank = (link.rank - root) % size
    if block_size(head) != HEAD_BYTES:
        raise RemoteProtocolError(
            f"{link.deadline.op} on rank {link.rank}: rank {src} sent a {head.nbytes}-byte "
            "message that is not a broadcast head (do all ranks run the same version?)"
        )
    data = head.buffers[0].cast("B") if head.buffers[0].format != "B" else head.buffers[0]
    frame_len = _LENGTH.unpack_from(data)[0]
    limit = header_limit(link.codec) + link.codec.max_message_bytes
    if _LENGTH.size + frame_len < HEAD_BYTES or frame_len > limit:
        raise RemoteProtocolError(
            f"{link.deadline.op} on rank {link.rank}: rank {src} announced a broadcast of "
            f"{frame_len} bytes (this rank accepts {HEAD_BYTES - _LENGTH.size}..{limit}: "
            "CodecOptions.max_message_bytes)"
        )
    header = _header_in(data, frame_len, into)
    if header is not None and into is not None:
        start = _LENGTH.size + len(header)
        into[: HEAD_BYTES - start] = data[start:HEAD_BYTES]
        tail = into[HEAD_BYTES - start :]
    else:
        frame = alloc_buffer(frame_len)
        frame[: HEAD_BYTES - _LENGTH.size] = data[_LENGTH.size : HEAD_BYTES]
        tail = frame[HEAD_BYTES - _LENGTH.size :]
    parts = [tail[start:stop] for start, stop in split(tail.nbytes, size)]
    recv_bytes(link, root, parts[vrank])
    left, right = (link.rank - 1) % size, (link.rank + 1) % size
    for s in range(size - 1):
        send = (right, bytes_message(parts[(vrank - s) % size])) if right != root else None
        recv_bytes(link, left, parts[(vrank - s - 1) % size], send=send)
    if header is not None and into is not None:
        return Encoded(header=header, buffers=[into])
    return unpack(frame, link.codec)


def _header_in(data: memoryview, frame_len: int, into: memoryview | None) -> bytes | None:
    """The root's codec header when the payload lands in ``into``: the header lies inside the
    head, and says one uncompressed array buffer of exactly ``into.nbytes`` bytes follows."""
    if into is None:
        return None
    try:
        length = header_length(data[_LENGTH.size : _LENGTH.size + FIXED_PREFIX])
        if _LENGTH.size + length > HEAD_BYTES or length + into.nbytes != frame_len:
            return None
        header = bytes(data[_LENGTH.size : _LENGTH.size + length])
        parsed = Header.parse(header)
    except CodecError:
        return None  # not a landing header: unpack() below reports what is wrong with it
    entries = parsed.entries
    if parsed.kind is not Kind.ARRAY or len(entries) != 1 or entries[0].codec != CODEC_NONE:
        return None
    return header if entries[0].wire_len == into.nbytes else None


class _Stream:
    """The root's message as one byte stream over its pieces, sliced without joining them."""

    def __init__(self, pieces: list[bytes | memoryview]) -> None:
        self._pieces = [_bytes(p) for p in pieces]
        self.total = sum(p.nbytes for p in self._pieces)

    def take(self, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)``: a view when they lie in one piece, else a joined copy
        (a block spans a piece boundary at most once per piece)."""
        found: list[memoryview] = []
        offset = 0
        for piece in self._pieces:
            end = offset + piece.nbytes
            if end > start and offset < stop:
                found.append(piece[max(start - offset, 0) : min(stop, end) - offset])
            if end >= stop:
                break
            offset = end
        if len(found) == 1:
            return found[0]
        return memoryview(b"".join(found))


def _bytes(piece: bytes | memoryview) -> memoryview:
    view = memoryview(piece)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
