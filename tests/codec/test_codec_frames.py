"""Framing: strict about length, magic, version, counts; forged input is a CodecError."""

from __future__ import annotations

import collections
import contextlib
import struct
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from collectives.codec import (
    FIXED_PREFIX,
    MAX_DEPTH_LIMIT,
    MAX_HEADER_BYTES,
    CodecOptions,
    Encoded,
    check_header,
    check_header_length,
    decode,
    decode_array,
    dumps,
    encode,
    header_length,
    header_limit,
    loads,
    message_sizes,
    pack,
    unpack,
)
from collectives.codec.frames import CODEC_NONE, BufferEntry, Header, Kind
from collectives.errors import CodecError, ConfigurationError, RemoteProtocolError

from .helpers import CI

PICKLE = CodecOptions(allow_pickle=True)
SMALL: list[tuple[object, CodecOptions]] = [
    (torch.tensor([1.5, -0.0], dtype=torch.bfloat16), CodecOptions()),
    (np.arange(3, dtype=np.int8), CodecOptions()),
    (b"hello", CodecOptions()),
    (bytearray(b""), CodecOptions()),
    ({"a": torch.arange(3), "b": [None, 1.5]}, CodecOptions()),
    ({"a": torch.arange(3), "b": (None, b"x" * 1030)}, CodecOptions()),
    ({"a": torch.arange(3), "b": collections.OrderedDict(c=b"x" * 1030)}, PICKLE),
    ({"z": torch.zeros(5000)}, CodecOptions(compression="zstd")),
    ([torch.zeros(3000, dtype=torch.int16)], CodecOptions(compression="lz4")),
    (torch.rand(1, 2, 2, 3), CodecOptions(image_codec="png")),
]


@pytest.mark.parametrize("obj,options", SMALL, ids=lambda x: type(x).__name__)
def test_every_truncation_is_refused(obj: object, options: CodecOptions) -> None:
    frame = dumps(obj, options)
    for i in range(len(frame)):
        with pytest.raises(CodecError):
            loads(frame[:i], options)


@pytest.mark.parametrize("obj,options", SMALL, ids=lambda x: type(x).__name__)
def test_trailing_garbage_is_refused(obj: object, options: CodecOptions) -> None:
    frame = dumps(obj, options)
    for extra in (b"\0", b"garbage", bytes(16)):
        with pytest.raises(CodecError, match="trailing"):
            loads(frame + extra, options)


def test_header_is_aligned_and_self_describing() -> None:
    enc = encode({"t": torch.arange(10), "n": np.ones(3)})
    assert len(enc.header) % 16 == 0
    assert header_length(enc.header[:FIXED_PREFIX]) == len(enc.header)
    assert message_sizes(enc.header) == [b.nbytes for b in enc.buffers]
    assert enc.nbytes == len(pack(enc))
    again = unpack(pack(enc))
    assert again.header == enc.header
    assert [bytes(b) for b in again.buffers] == [bytes(b) for b in enc.buffers]


def test_stream_reader_protocol() -> None:
    """Read a frame from a byte stream the way a socket reader would."""
    frame = dumps([torch.ones(4), "x"])
    prefix = frame[:FIXED_PREFIX]
    header = frame[: header_length(prefix)]
    pos, buffers = len(header), []
    for size in message_sizes(header):
        buffers.append(frame[pos : pos + size])
        pos += size
    assert pos == len(frame)
    assert torch.equal(decode(header, buffers)[0], torch.ones(4))


def _mutate(frame: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(frame)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    "offset,fmt,value,match",
    [
        (0, "<B", ord("X"), "magic"),
        (4, "<B", 2, "version"),
        (5, "<B", 9, "kind"),
        (5, "<B", Kind.BYTES, "body"),
        (6, "<B", 3, "wrong length"),
        (6, "<B", 15, "padding"),
        (6, "<B", 16, "malformed"),
        (7, "<B", 1, "malformed"),
        (8, "<I", 1 << 31, "MAX_HEADER_BYTES"),
        (8, "<I", 16, "too small"),
        (12, "<I", 2, "too small|buffer"),
        (16, "<B", 0x08, "flags"),
        (16, "<B", 0x03, "flags"),
        (17, "<Q", 1 << 50, "absurd"),
        (25, "<Q", 99, "raw_len"),
        (34, "<B", 99, "dtype code"),
        (34, "<B", 0, "dtype code"),
        (33, "<B", 5, "malformed"),
        (35, "<B", 1, "png"),
        (36, "<B", 3, "length"),
        (36, "<B", 65, "malformed"),
        (37, "<B", 0, "device"),
    ],
)
def test_corrupted_header_fields(offset: int, fmt: str, value: int, match: str) -> None:
    frame = dumps(torch.zeros(2, 3))
    # prefix 16 | entry 17 | meta: framework, dtype, encoding, ndim, devlen, "cpu", shape...
    with pytest.raises(CodecError, match=match):
        loads(_mutate(frame, offset, fmt, value))


def test_corrupted_shape_is_refused() -> None:
    enc = encode(torch.zeros(2, 3))
    shape_at = FIXED_PREFIX + 17 + 5 + 3
    for value in (4, 0, 1 << 62, (1 << 64) - 1):
        header = _mutate(enc.header, shape_at, "<Q", value)
        with pytest.raises(CodecError):
            decode(header, enc.buffers)


def test_absurd_sizes_are_refused_before_allocating() -> None:
    entry = BufferEntry(CODEC_NONE, False, 1 << 45, 1 << 45)
    header = Header(Kind.BYTES, (entry,), b"\0").to_bytes()
    with pytest.raises(CodecError, match="absurd"):
        message_sizes(header)
    entry = BufferEntry(1, False, 10, 1 << 39)  # zstd cannot expand 10 bytes to 512 GiB
    header = Header(Kind.BYTES, (entry,), b"\0").to_bytes()
    with pytest.raises(CodecError, match="ratio"):
        decode(header, [bytes(10)])
    prefix = struct.pack("<4sBBBBII", b"CLCD", 1, 2, 0, 0, MAX_HEADER_BYTES + 16, 1)
    with pytest.raises(CodecError, match="MAX_HEADER_BYTES"):
        header_length(prefix)


def test_wrong_buffer_count_or_length() -> None:
    enc = encode({"t": torch.ones(3)})
    with pytest.raises(CodecError, match="buffers"):
        decode(enc.header, enc.buffers[:-1])
    with pytest.raises(CodecError, match="bytes, header says"):
        decode(enc.header, [enc.buffers[0][:-1], enc.buffers[1]])
    with pytest.raises(CodecError, match="not bytes-like"):
        decode(enc.header, [enc.buffers[0], 5])  # type: ignore[list-item]
    with pytest.raises(CodecError, match="header"):
        decode(enc.header[:-16], enc.buffers)


def test_unreferenced_or_forged_references() -> None:
    enc = encode({"t": torch.ones(3)})
    plain = encode({"t": 1})
    # The stream of a message without tensors, with an extra buffer nobody refers to.
    extra = Encoded(
        Header(
            Kind.TREE,
            (BufferEntry(CODEC_NONE, False, 12, 12), Header.parse(plain.header).entries[0]),
            b"",
        ).to_bytes(),
        [enc.buffers[0], plain.buffers[0]],
    )
    with pytest.raises(CodecError, match="never refers"):
        decode(extra.header, extra.buffers)
    # A stream referring to a buffer that is not there.
    missing = Encoded(
        Header(Kind.TREE, Header.parse(enc.header).entries[1:], b"").to_bytes(),
        enc.buffers[1:],
    )
    with pytest.raises(CodecError, match="missing buffer"):
        decode(missing.header, missing.buffers)


def _frames() -> list[bytes]:
    return [dumps(obj, options) for obj, options in SMALL]


@CI
@given(st.data())
def test_random_corruption_never_escapes_as_another_error(data: Any) -> None:
    frames = _frames()
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    options = SMALL[index][1]
    with contextlib.suppress(CodecError):
        loads(frame, options)


@CI
@given(st.binary(max_size=200))
def test_random_bytes_are_refused(blob: bytes) -> None:
    with pytest.raises(CodecError):
        loads(blob)
    with pytest.raises(CodecError):
        loads(b"CLCD\x01" + blob)


def test_check_header_returns_the_parsed_header_and_message_sizes() -> None:
    enc = encode({"t": torch.arange(10), "n": np.ones(3), "b": b"x" * 5000})
    parsed = check_header(enc.header)
    assert parsed.kind is Kind.TREE and len(parsed.entries) == 4
    sizes = [b.nbytes for b in enc.buffers]
    assert message_sizes(enc.header) == parsed.wire_sizes == sizes
    exact = sum(b.nbytes for b in enc.buffers)
    assert message_sizes(enc.header, CodecOptions(max_message_bytes=exact)) == sizes
    with pytest.raises(CodecError, match="max_message_bytes"):
        message_sizes(enc.header, CodecOptions(max_message_bytes=exact - 1))
    with pytest.raises(CodecError, match="max_buffers=3"):
        check_header(enc.header, CodecOptions(max_buffers=3))


def test_an_already_checked_header_is_still_held_to_the_decoders_limits() -> None:
    enc = encode({"t": torch.arange(10), "b": b"x" * 5000})
    parsed = check_header(enc.header)
    assert check_header(parsed) is parsed
    assert decode(parsed, enc.buffers)["b"] == b"x" * 5000
    exact = sum(b.nbytes for b in enc.buffers)
    with pytest.raises(CodecError, match="max_message_bytes"):
        decode(parsed, enc.buffers, CodecOptions(max_message_bytes=exact - 1))
    with pytest.raises(CodecError, match="max_buffers=1"):
        decode(parsed, enc.buffers, CodecOptions(max_buffers=1))
    with pytest.raises(CodecError, match="expected a tensor"):
        decode_array(parsed, enc.buffers)
    tensor = encode(torch.arange(4))
    got = decode_array(check_header(tensor.header), tensor.buffers)
    assert torch.equal(got, torch.arange(4))


def test_an_announced_header_length_is_checked_before_allocating() -> None:
    options = CodecOptions(max_buffers=10)
    limit = header_limit(options)
    assert check_header_length(limit, options, src=3) == limit
    with pytest.raises(RemoteProtocolError, match="rank 3 announced"):
        check_header_length(limit + 1, options, src=3)


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_depth", 0),
        ("max_depth", MAX_DEPTH_LIMIT + 1),
        ("max_depth", 2.5),
        ("max_depth", True),
        ("max_message_bytes", -1),
        ("max_buffers", 0),
        ("max_buffers", 1 << 33),
    ],
)
def test_limit_options_are_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=field):
        CodecOptions(**{field: value})  # type: ignore[arg-type]
