"""ACK and CREDIT as plain tuples on the per-frame path; protobuf writes and reads every byte.

An ACK rides in nearly every frame.  The session and recovery read its fields many times per
frame, so :func:`~.frames.parse_chunks` hands them over as :class:`AckFields` and
:class:`CreditFields` (tuples: attribute reads and unpacking cost less than on protobuf objects,
and empty ranges, which the receiver of an ACK ignores, are left out once here).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from collectives.transport._pb import transport_pb2 as pb

__all__ = ["CONTROL_HEADER", "AckFields", "CreditFields", "ack_chunk", "ack_fields", "credit_chunk"]

#: A control chunk's header: kind (frames.ChunkKind), 3 zero bytes, length of the message.
CONTROL_HEADER = struct.Struct(">BxxxI")
_ACK_KIND = 2  # frames.ChunkKind.ACK and .CREDIT (frames imports this module)
_CREDIT_KIND = 3


class AckFields(NamedTuple):
    """What an ACK says: ``acked`` and ``pending`` ranges (empty ones left out), the
    ``rejected`` first numbers, ``ack_delay`` and the flow-control ``credit`` riding on it (0:
    none; a CREDIT chunk's limit, which every ACK carries, without a chunk of its own)."""

    acked: list[tuple[int, int]]
    pending: list[tuple[int, int]]
    rejected: list[int]
    ack_delay: float
    credit: int


class CreditFields(NamedTuple):
    limit: int


def ack_chunk(
    acked: list[tuple[int, int]],
    pending: list[tuple[int, int]],
    rejected: list[int],
    ack_delay: float,
    credit: int = 0,
) -> bytes:
    """The ACK chunk of these fields (``frames.control_chunk(ACK, pb.Ack(...))``)."""
    msg = pb.Ack(rejected=rejected, ack_delay=ack_delay, credit=credit)
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
    rejected = msg.rejected
    return AckFields(
        _ranges(msg.acked),
        _ranges(msg.pending),
        list(rejected) if len(rejected) else [],
        msg.ack_delay,
        msg.credit,
    )


def _ranges(field: Any) -> list[tuple[int, int]]:
    """``[(r.start, r.stop) for r in field if r.start < r.stop]``, with the usual lengths (none,
    one: a small message's ACK) taken without the loop: reading a repeated field costs more per
    element than the comprehension around it."""
    n = len(field)
    if n == 0:
        return []
    if n == 1:
        r = field[0]
        start, stop = r.start, r.stop
        return [(start, stop)] if start < stop else []
    return [(r.start, r.stop) for r in field if r.start < r.stop]
