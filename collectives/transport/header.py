"""The fixed binary header every datagram starts with ("Wire format" in docs/udp-transport.md).

Fixed-size and parsed with one ``struct`` call: it is read for every datagram before anything is
authenticated, so it must be cheap, allocate little and reject garbage by itself.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

VERSION = 1

_HEADER = struct.Struct(">BBH4sQQHHI")
HEADER_SIZE = _HEADER.size  # 32
pack_header_into = _HEADER.pack_into


class PacketType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    SEGMENT = 3


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


class HeaderError(ValueError):
    """Not a datagram of this protocol (too short, other version, unknown type, bad fields)."""


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """The header at the start of ``data``; raises :class:`HeaderError` when it cannot be one."""
    if len(data) < HEADER_SIZE:
        raise HeaderError(f"datagram of {len(data)} bytes is shorter than a header")
    version, ptype, flags, tag, session, number, index, count, length = _HEADER.unpack_from(data)
    if version != VERSION:
        raise HeaderError(f"unknown version {version}")
    if not PacketType.HELLO <= ptype <= PacketType.SEGMENT:
        raise HeaderError(f"unknown datagram type {ptype}")
    if flags:
        raise HeaderError(f"unknown flags {flags:#x}")  # none are defined in this version
    if count == 0 or index >= count or number < index:
        raise HeaderError(f"segment {index} of {count} (number {number}) is impossible")
    return Header(ptype, flags, tag, session, number, index, count, length)


def segment_layout(frame_length: int, count: int) -> int:
    """The payload size of every segment but the last, for a frame split into ``count``.

    Both sides compute it from the header alone: the sender splits evenly (``ceil``), so the
    receiver knows where each segment belongs without trusting its length.
    """
    return -(-frame_length // count)


def segments_for(frame_length: int, max_datagram: int) -> int:
    """How many datagrams of at most ``max_datagram`` bytes carry a sealed frame."""
    return max(1, -(-frame_length // (max_datagram - HEADER_SIZE)))
