"""ACK and CREDIT chunks: protobuf's bytes on the wire, plain tuples after parse_chunks."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.transport._pb import transport_pb2 as pb
from collectives.transport.control_fields import AckFields, CreditFields, ack_chunk, credit_chunk
from collectives.transport.frames import (
    ChunkKind,
    ControlChunk,
    FrameError,
    control_chunk,
    parse_chunks,
)

U64 = st.integers(0, 2**64 - 1)
RANGES = st.lists(st.tuples(U64, U64), max_size=5)
DELAY = st.one_of(st.just(0.0), st.floats(0, 0.1, allow_nan=False))


def _pb_ack(
    acked: list[tuple[int, int]], pending: list[tuple[int, int]], rejected: list[int], delay: float
) -> pb.Ack:
    msg = pb.Ack(rejected=rejected, ack_delay=delay)
    for start, stop in acked:
        msg.acked.add(start=start, stop=stop)
    for start, stop in pending:
        msg.pending.add(start=start, stop=stop)
    return msg


@settings(max_examples=200, deadline=None)
@given(RANGES, RANGES, st.lists(U64, max_size=5), DELAY)
def test_an_ack_chunk_round_trips_with_empty_ranges_left_out(
    acked: list[tuple[int, int]],
    pending: list[tuple[int, int]],
    rejected: list[int],
    delay: float,
) -> None:
    raw = ack_chunk(acked, pending, rejected, delay)
    assert raw == control_chunk(ChunkKind.ACK, _pb_ack(acked, pending, rejected, delay))
    [chunk] = parse_chunks(memoryview(raw))
    assert isinstance(chunk, ControlChunk) and chunk.kind is ChunkKind.ACK
    fields = chunk.msg
    assert isinstance(fields, AckFields)
    assert fields.acked == [(a, b) for a, b in acked if a < b]
    assert fields.pending == [(a, b) for a, b in pending if a < b]
    assert fields.rejected == rejected
    assert math.isclose(fields.ack_delay, delay) or fields.ack_delay == delay


@given(U64)
def test_credit_rides_in_an_ack_chunk(limit: int) -> None:
    raw = ack_chunk([(1, 2)], [], [], 0.0, limit)
    msg = _pb_ack([(1, 2)], [], [], 0.0)
    msg.credit = limit
    assert raw == control_chunk(ChunkKind.ACK, msg)
    [chunk] = parse_chunks(memoryview(raw))
    assert chunk.msg == AckFields([(1, 2)], [], [], 0.0, limit)


@given(U64)
def test_a_credit_chunk_round_trips(limit: int) -> None:
    raw = credit_chunk(limit)
    assert raw == control_chunk(ChunkKind.CREDIT, pb.Credit(limit=limit))
    [chunk] = parse_chunks(memoryview(raw))
    assert isinstance(chunk, ControlChunk) and chunk.msg == CreditFields(limit)


def test_a_malformed_ack_is_a_frame_error() -> None:
    bad = struct.pack(">BxxxI", ChunkKind.ACK, 2) + b"\x0a\x05"  # a Range longer than the chunk
    with pytest.raises(FrameError):
        parse_chunks(memoryview(bad))
