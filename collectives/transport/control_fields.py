"""ACK and CREDIT as plain tuples on the per-frame path; protobuf writes and reads every byte.

An ACK rides in nearly every frame.  The session and recovery read its fields many times per
frame, so :func:`~.frames.parse_chunks` hands them over as :class:`AckFields` and
:class:`CreditFields` (tuples: attribute reads and unpacking cost less than on protobuf objects,
and empty ranges, which the receiver of an ACK ignores, are left out once here).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from collectives.transport._pb import transport_pb2 as pb

__all__ = ["CONTROL_HEADER", "AckFields", "CreditFields", "ack_chunk", "ack_fields", "credit_chunk"]

#: A control chunk's header: kind (frames.ChunkKind), 3 zero bytes, length of the message.
CONTROL_HEADER = struct.Struct(">BxxxI")
_ACK_KIND = 2  # frames.ChunkKind.ACK and .CREDIT (frames imports this module)
_CREDIT_KIND = 3


class AckFields(NamedTuple):
    """What an ACK says: ``acked`` and ``pending`` ranges (empty ones left out), the
    ``rejected`` first numbers and ``ack_delay``."""

    acked: list[tuple[int, int]]
    pending: list[tuple[int, int]]
    rejected: list[int]
    ack_delay: float


class CreditFields(NamedTuple):
    limit: int


def ack_chunk(
    acked: list[tuple[int, int]],
    pending: list[tuple[int, int]],
    rejected: list[int],
    ack_delay: float,
) -> bytes:
    """The ACK chunk of these fields (``frames.control_chunk(ACK, pb.Ack(...))``)."""
    msg = pb.Ack(rejected=rejected, ack_delay=ack_delay)
    add = msg.acked.add
    for start, stop in acked:
        add(start=start, stop=stop)
    if pending:
        add = msg.pending.add
        for start, stop in pending:
            add(start=start, stop=stop)
    body: bytes = msg.SerializeToString()
    return CONTROL_HEADER.pack(_ACK_KIND, len(body)) + body


def credit_chunk(limit: int) -> bytes:
    """The CREDIT chunk (``frames.control_chunk(CREDIT, pb.Credit(limit=limit))``)."""
    body: bytes = pb.Credit(limit=limit).SerializeToString()
    return CONTROL_HEADER.pack(_CREDIT_KIND, len(body)) + body


def ack_fields(msg: pb.Ack) -> AckFields:
    """The fields of a parsed ACK, empty ranges left out."""
    return AckFields(
        [(r.start, r.stop) for r in msg.acked if r.start < r.stop],
        [(r.start, r.stop) for r in msg.pending if r.start < r.stop],
        list(msg.rejected),
        msg.ack_delay,
    )
