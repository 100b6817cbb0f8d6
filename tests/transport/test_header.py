"""The fixed datagram header, the segment layout and the chunk codec."""

from __future__ import annotations

import pytest

from collectives.transport._pb import transport_pb2 as pb
from collectives.transport.frames import (
    DATA_HEADER_SIZE,
    ChunkKind,
    ControlChunk,
    DataChunk,
    FrameError,
    control_chunk,
    pack_data_header,
    parse_chunks,
)
from collectives.transport.header import (
    HEADER_SIZE,
    Header,
    HeaderError,
    PacketType,
    parse_header,
    segment_layout,
    segments_for,
)
from collectives.transport.sending import OutMessage


def test_header_round_trip_and_size() -> None:
    h = Header(PacketType.SEGMENT, 0, b"abcd", 2**64 - 1, 2**63 + 5, 5, 9, 2**32 - 1)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE == 32
    assert parse_header(raw + b"payload") == h
    assert h.first_number == 2**63


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01" * 31,
        bytes([2]) + Header(3, 0, b"abcd", 1, 1, 0, 1, 1).pack()[1:],  # other version
        Header(9, 0, b"abcd", 1, 1, 0, 1, 1).pack(),  # unknown type
        Header(3, 0, b"abcd", 1, 1, 0, 0, 1).pack(),  # zero segments
        Header(3, 0, b"abcd", 1, 5, 3, 3, 1).pack(),  # index past count
        Header(3, 0, b"abcd", 1, 2, 3, 9, 1).pack(),  # number below index
    ],
)
def test_bad_headers_raise_header_error(raw: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_header(raw)


@pytest.mark.parametrize("length", [1, 16, 1167, 1168, 1169, 65408, 65409, 1 << 20])
@pytest.mark.parametrize("max_datagram", [100, 1200, 9000, 65000])
def test_segment_layout_covers_the_frame_exactly(length: int, max_datagram: int) -> None:
    count = segments_for(length, max_datagram)
    per = segment_layout(length, count)
    last = length - (count - 1) * per
    assert 0 < last <= per <= max_datagram - HEADER_SIZE
    assert (count - 1) * per + last == length


def test_offsets_beyond_4_gib_survive_the_chunk_header() -> None:
    buf = bytearray(DATA_HEADER_SIZE + 3)
    huge = 5 * 2**30 + 7
    pack_data_header(
        buf,
        0,
        channel=2**32 - 1,
        comm_id=2**64 - 1,
        epoch=3,
        seq=4,
        message_id=5,
        offset=huge - 3,
        length=3,
        meta_len=0,
        body_len=huge,
    )
    [chunk] = parse_chunks(memoryview(buf))
    assert isinstance(chunk, DataChunk)
    assert (chunk.offset, chunk.body_len, chunk.channel) == (huge - 3, huge, 2**32 - 1)


def test_segmentation_arithmetic_of_a_body_over_2_gib_without_the_memory() -> None:
    block = memoryview(bytearray(range(256)) * (1 << 16))  # 16 MiB, viewed many times
    views = [block] * 160  # 2.5 GiB
    msg = OutMessage(1, 0, 0, b"meta", views)
    assert msg.total == 4 + 160 * len(block)
    out = memoryview(bytearray(1 << 20))
    msg.copy_into(out, 4 + 100)
    assert out[:4] == b"meta" and out[4:104] == block[:100]
    # Jump the cursor near the end and read across view boundaries up to the last byte.
    msg.view_index, msg.view_offset, msg.pos = 159, len(block) - 10, msg.total - 10
    msg.copy_into(out, 10)
    assert out[:10] == block[-10:]
    assert msg.framed


def test_control_chunks_round_trip_and_garbage_is_refused() -> None:
    ack = pb.Ack(rejected=[7], ack_delay=0.5)
    ack.acked.add(start=1, stop=9)
    raw = control_chunk(ChunkKind.ACK, ack) + control_chunk(ChunkKind.PING, pb.Ping())
    chunks = parse_chunks(memoryview(raw))
    assert [c.kind for c in chunks if isinstance(c, ControlChunk)] == [
        ChunkKind.ACK,
        ChunkKind.PING,
    ]
    assert list(chunks[0].msg.rejected) == [7]
    for bad in (raw[:-1] + b"\x63", raw[:5], b"\x09\0\0\0\0\0\0\0", raw + b"\x01"):
        with pytest.raises(FrameError):
            parse_chunks(memoryview(bad))
