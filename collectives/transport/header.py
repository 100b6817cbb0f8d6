"""The fixed binary header every datagram starts with ("Wire format" in docs/udp-transport.md).

Fixed-size and parsed with one ``struct`` call: it is read for every datagram before anything is
authenticated, so it must be cheap, allocate little and reject garbage by itself.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

import numpy as np

VERSION = 1

_HEADER = struct.Struct(">BBH4sQQHHI")
HEADER_SIZE = _HEADER.size  # 32
pack_header_into = _HEADER.pack_into
pack_header = _HEADER.pack


class PacketType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    SEGMENT = 3


_HELLO = int(PacketType.HELLO)  # plain ints: IntEnum members compare slower, once per datagram
_SEGMENT = int(PacketType.SEGMENT)


class Header(NamedTuple):
    """One datagram's header.  ``session_id`` is the *receiver's* id (0 in HELLO)."""

    type: int
    flags: int
    cluster_tag: bytes
    session_id: int
    packet_number: int
    segment: int  # index of this datagram in its frame
    segments: int  # datagrams of the frame
    frame_length: int

    @property
    def first_number(self) -> int:
        """The packet number of the frame's first segment: it selects the AEAD nonce."""
        return self.packet_number - self.segment

    def pack(self) -> bytes:
        return _HEADER.pack(
            VERSION,
            self.type,
            self.flags,
            self.cluster_tag,
            self.session_id,
            self.packet_number,
            self.segment,
            self.segments,
            self.frame_length,
        )


_new = tuple.__new__


class HeaderError(ValueError):
    """Not a datagram of this protocol (too short, other version, unknown type, bad fields)."""


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """The header at the start of ``data``; raises :class:`HeaderError` when it cannot be one."""
    if len(data) < HEADER_SIZE:
        raise HeaderError(f"datagram of {len(data)} bytes is shorter than a header")
    version, ptype, flags, tag, session, number, index, count, length = _HEADER.unpack_from(data)
    if version != VERSION:
        raise HeaderError(f"unknown version {version}")
    if not _HELLO <= ptype <= _SEGMENT:
        raise HeaderError(f"unknown datagram type {ptype}")
    if flags:
        raise HeaderError(f"unknown flags {flags:#x}")  # none are defined in this version
    if count == 0 or index >= count or number < index:
        raise HeaderError(f"segment {index} of {count} (number {number}) is impossible")
    # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function (twice the cost).
    return _new(Header, (ptype, flags, tag, session, number, index, count, length))


def segment_layout(frame_length: int, count: int) -> int:
    """The payload size of every segment but the last, for a frame split into ``count``.

    Both sides compute it from the header alone: the sender splits evenly (``ceil``), so the
    receiver knows where each segment belongs without trusting its length.
    """
    return -(-frame_length // count)


def segments_for(frame_length: int, max_datagram: int) -> int:
    """How many datagrams of at most ``max_datagram`` bytes carry a sealed frame."""
    return max(1, -(-frame_length // (max_datagram - HEADER_SIZE)))


_INDEX = np.arange(65536, dtype=np.uint64)  # segment indices (a frame has at most 65535)
_NUMBER_AT = 16  # offsets in the header of the packet number (8 bytes) and segment index (2)
_SEGMENT_AT = 24


def segment_heads(head: bytes | memoryview, start: int, rows: int) -> np.ndarray:
    """Headers of segments ``start .. start + rows`` of a frame, from segment ``start``'s
    ``head``: the same but for the packet number and index.  One numpy pass instead of a
    ``struct`` call per datagram, for building GSO images and checking GRO batches."""
    out = np.empty((rows, HEADER_SIZE), dtype=np.uint8)
    out[:] = np.frombuffer(head, dtype=np.uint8, count=HEADER_SIZE)
    number = int.from_bytes(head[_NUMBER_AT : _NUMBER_AT + 8], "big")
    step = _INDEX[:rows]
    numbers = (step + np.uint64(number)).astype(">u8")
    out[:, _NUMBER_AT : _NUMBER_AT + 8] = numbers.view(np.uint8).reshape(rows, 8)
    index = (step + np.uint64(start)).astype(">u2")
    out[:, _SEGMENT_AT : _SEGMENT_AT + 2] = index.view(np.uint8).reshape(rows, 2)
    return out
