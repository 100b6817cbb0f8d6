"""Chunks: what a sealed frame's plaintext is made of ("Wire format" in docs/udp-transport.md).

A frame's plaintext is a sequence of chunks.  A DATA chunk has a fixed binary header (parsed with
one ``struct`` call: it sits on the bulk path) followed by bytes of one message's stream, which
is its meta followed by its body; the chunk at stream offset 0 holds the whole meta.  A control
chunk (ACK, CREDIT, PING, CLOSE, ABORT) is a small kind+length header and a protobuf message;
ACK and CREDIT, in nearly every frame, parse to the plain tuples of :mod:`.control_fields`.
Frames are authenticated before they are parsed, so a malformed chunk means a buggy peer, not an
attacker: :class:`FrameError` then drops the whole frame.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

from collectives.transport._pb import transport_pb2 as pb
from collectives.transport.control_fields import CONTROL_HEADER, CreditFields, ack_fields

# ChunkKind.DATA as a plain int, for the per-frame paths (IntEnum compares and packs are slower).
DATA_KIND = 1
# kind, flags, meta length, channel, comm id, epoch, channel sequence, message id, stream offset,
# chunk length, body length.  64-bit offsets and lengths: bodies over 2 (or 4) GiB are fine.
DATA_HEADER = struct.Struct(">BBHIQQQQQIQ")
DATA_HEADER_SIZE = DATA_HEADER.size
CONTROL_HEADER_SIZE = CONTROL_HEADER.size
_U64 = (1 << 64) - 1


class ChunkKind(enum.IntEnum):
    DATA = 1
    ACK = 2
    CREDIT = 3
    PING = 4
    CLOSE = 5
    ABORT = 6


_CONTROL_TYPES: dict[int, Any] = {
    ChunkKind.ACK: pb.Ack,
    ChunkKind.CREDIT: pb.Credit,
    ChunkKind.PING: pb.Ping,
    ChunkKind.CLOSE: pb.Close,
    ChunkKind.ABORT: pb.Abort,
}


# int -> member, for parse_chunks: calling ChunkKind(kind) goes through EnumType.__call__, which
# costs more than the rest of parsing a control chunk.
_KINDS: dict[int, ChunkKind] = {int(k): k for k in ChunkKind}
assert DATA_KIND == ChunkKind.DATA
_ACK_KIND = int(ChunkKind.ACK)
_CREDIT_KIND = int(ChunkKind.CREDIT)
assert CONTROL_HEADER.size == 8


View = memoryview  # (mypyc looks class-body annotations other than int/str/... up in the module)


class FrameError(ValueError):
    """An authenticated frame whose chunks do not parse (a peer bug)."""


class DataChunk(NamedTuple):
    channel: int
    comm_id: int
    epoch: int
    seq: int
    message_id: int
    offset: int  # in the message's stream: meta, then body
    meta_len: int
    body_len: int
    data: View


class ControlChunk(NamedTuple):
    kind: ChunkKind
    #: The protobuf message of its kind; for ACK and CREDIT control_fields' AckFields, CreditFields.
    msg: Any


Chunk = DataChunk | ControlChunk
_new = tuple.__new__


def control_chunk(kind: ChunkKind, msg: Any) -> bytes:
    body: bytes = msg.SerializeToString()
    return CONTROL_HEADER.pack(kind, len(body)) + body


def pack_data_header(
    buf: bytearray | memoryview,
    pos: int,
    *,
    channel: int,
    comm_id: int,
    epoch: int,
    seq: int,
    message_id: int,
    offset: int,
    length: int,
    meta_len: int,
    body_len: int,
) -> None:
    DATA_HEADER.pack_into(
        buf,
        pos,
        DATA_KIND,
        0,
        meta_len,
        channel,
        comm_id & _U64,
        epoch & _U64,
        seq,
        message_id,
        offset,
        length,
        body_len,
    )


def parse_chunks(plain: memoryview) -> list[Chunk]:
    """Every chunk of an authenticated frame's plaintext, in order."""
    chunks: list[Chunk] = []
    pos, end = 0, len(plain)
    unpack_data = DATA_HEADER.unpack_from
    unpack_control = CONTROL_HEADER.unpack_from
    while pos < end:
        kind = plain[pos]
        if kind == DATA_KIND:
            if end - pos < DATA_HEADER_SIZE:
                raise FrameError("truncated data chunk header")
            (_, _, meta_len, channel, comm, epoch, seq, mid, offset, length, body_len) = (
                unpack_data(plain, pos)
            )
            pos += DATA_HEADER_SIZE
            total = meta_len + body_len
            if length > end - pos or offset + length > total or (offset == 0 and length < meta_len):
                raise FrameError("data chunk outside its message or frame")
            if length == 0 and total != 0:
                raise FrameError("empty data chunk")
            data = plain[pos : pos + length]
            pos += length
            # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function.
            chunks.append(
                _new(DataChunk, (channel, comm, epoch, seq, mid, offset, meta_len, body_len, data))
            )
            continue
        if end - pos < CONTROL_HEADER_SIZE or kind not in _CONTROL_TYPES:
            raise FrameError(f"unknown or truncated chunk of kind {kind}")
        _, length = unpack_control(plain, pos)
        pos += CONTROL_HEADER_SIZE
        if length > end - pos:
            raise FrameError("control chunk longer than its frame")
        stop = pos + length
        msg: Any = _parse_message(_CONTROL_TYPES[kind], kind, plain[pos:stop])
        if kind == _ACK_KIND:
            msg = ack_fields(msg)
        elif kind == _CREDIT_KIND:
            msg = CreditFields(msg.limit)
        pos = stop
        chunks.append(_new(ControlChunk, (_KINDS[kind], msg)))
    return chunks


def _parse_message(msg_type: Any, kind: int, data: memoryview) -> Any:
    msg = msg_type()
    try:
        msg.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError
        raise FrameError(f"control chunk of kind {kind} does not parse") from err
    return msg
