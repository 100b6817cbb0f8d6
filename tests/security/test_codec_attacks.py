"""What a hostile peer can send to the codec: pickles, deep nesting, huge sizes, bombs, garbage.

Every refusal must be a CodecError raised before the harm: before unpickling, before allocating
what a header announces, before decompressing past the limit, and without crashing the process.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectives.codec import (
    CodecOptions,
    Encoded,
    Header,
    Kind,
    check_header,
    decode,
    decode_array,
    dumps,
    encode,
    loads,
    message_sizes,
    pack,
    unpack,
)
from collectives.codec.frames import CODEC_NONE, CODEC_ZSTD, BufferEntry
from collectives.errors import CodecError
from tests.codec.helpers import Custom, arrays, same, tensors

ROOT = Path(__file__).resolve().parents[2]
PICKLE = CodecOptions(allow_pickle=True)
TIB = 1 << 40
FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=250,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_ran: list[str] = []


def _pwn(path: str) -> None:
    _ran.append(path)
    Path(path).write_text("pwned")


class Exploit:
    """Unpickling this calls ``_pwn``: the shape of every pickle remote-code-execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _pwn, (self.path,)


def _message(kind: Kind, stream: bytes, codec: int = CODEC_NONE, raw_len: int = -1) -> Encoded:
    raw = len(stream) if raw_len < 0 else raw_len
    body = b"\0" if kind is Kind.BYTES else b""
    header = Header(kind, (BufferEntry(codec, False, len(stream), raw),), body)
    return Encoded(header.to_bytes(), [memoryview(stream)])


@contextmanager
def _peak_memory() -> Iterator[list[int]]:
    """Yields a list that holds the traced allocation peak (bytes) once the block is done."""
    out: list[int] = []
    tracemalloc.start()
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def _run_isolated(script: str) -> str:
    """Run ``script`` in a fresh interpreter: a crash fails the test instead of killing pytest."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr.decode()[-2000:]}"
    return done.stdout.decode()


# --- pickle ------------------------------------------------------------------------------------


def test_pickle_message_is_refused_before_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    frame = dumps({"x": Exploit(marker)}, PICKLE)
    assert not marker.exists()  # encoding does not run it
    from collectives.codec import objects

    read: list[object] = []
    real_load = objects.load
    monkeypatch.setattr(objects, "load", lambda *a: read.append(a) or real_load(*a))
    for attempt in (
        lambda: loads(frame),
        lambda: decode(unpack(frame, PICKLE).header, unpack(frame, PICKLE).buffers),
        lambda: decode_array(unpack(frame, PICKLE).header, unpack(frame, PICKLE).buffers),
    ):
        with pytest.raises(CodecError, match="pickle"):
            attempt()
    # A hand-made pickle frame, without the codec's encoder, is refused the same way.
    stream = pickle.dumps(Exploit(marker), protocol=5)
    raw = _message(Kind.PICKLE, stream)
    with pytest.raises(CodecError, match="refusing a pickle message"):
        decode(raw.header, raw.buffers)
    assert read == [] and _ran == [] and not marker.exists()
    # The exploit is real: a receiver that opts in runs it.
    loads(frame, PICKLE)
    assert marker.read_text() == "pwned"
    assert _ran == [str(marker)]
    _ran.clear()


def test_sender_refusal_names_the_type_and_the_opt_in() -> None:
    with pytest.raises(CodecError) as err:
        dumps({"ok": [1, 2.0], "bad": Custom(1)})
    text = str(err.value)
    assert "Custom" in text
    assert "CodecOptions(allow_pickle=True)" in text and "COMFY_CLUSTER_ALLOW_PICKLE=1" in text
    assert "any peer that can reach a rank run code on it" in text


def test_opted_in_pickle_round_trips_and_plain_data_still_reaches_everyone() -> None:
    obj = {"c": Custom(7), "t": torch.arange(4), "s": {1, 2}}
    back = loads(dumps(obj, PICKLE), PICKLE)
    assert back["c"] == Custom(7) and back["s"] == {1, 2} and torch.equal(back["t"], obj["t"])
    plain = {"t": torch.ones(3), "n": [1, (2, "x")], "b": b"y" * 5000}
    frame = dumps(plain, PICKLE)
    assert same(loads(frame), plain)  # a receiver that did not opt in decodes it


# --- depth --------------------------------------------------------------------------------------


def _nested_tuple(depth: int) -> tuple[Any, ...]:
    obj: tuple[Any, ...] = ()
    for _ in range(depth - 1):
        obj = (obj,)
    return obj


def test_deep_legitimate_objects_round_trip_in_a_subprocess() -> None:
    out = _run_isolated(
        """
        from collectives.codec import CodecOptions, dumps, loads
        from collectives.errors import CodecError
        obj = ()
        for _ in range(199):
            obj = (obj,)  # 200 tuples deep
        assert loads(dumps(obj)) == obj
        mixed = [1]
        for i in range(255):
            mixed = (mixed,) if i % 3 == 0 else {str(i): mixed} if i % 3 == 1 else [mixed]
        assert loads(dumps(mixed)) == mixed  # 256 deep: the default max_depth
        try:
            loads(dumps(obj), CodecOptions(max_depth=100))
        except CodecError as e:
            assert "max_depth=100" in str(e), e
        else:
            raise AssertionError("a receiver's max_depth was not applied")
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_encoder_refuses_depth_past_max_depth() -> None:
    assert loads(dumps(_nested_tuple(256))) == _nested_tuple(256)
    with pytest.raises(CodecError, match="max_depth=256"):
        dumps(_nested_tuple(257))
    with pytest.raises(CodecError, match="max_depth=10"):
        dumps({(((((((((((1,),),),),),),),),),),): 1}, CodecOptions(max_depth=10))


@pytest.mark.parametrize("depth", [10_000, 1_000_000])
def test_crafted_deep_frames_are_refused_without_crashing(depth: int) -> None:
    out = _run_isolated(
        f"""
        from collectives.codec import Header, Kind, decode
        from collectives.codec.frames import BufferEntry
        from collectives.errors import CodecError
        depth = {depth}
        # The nested-document tuple form: an ext32 of type 1 around the next level.
        old = b"".join(
            b"\\xc9" + (6 * (depth - 1 - i) + 1).to_bytes(4, "big") + b"\\x01"
            for i in range(depth)
        ) + b"\\xc0"
        streams = {{
            "arrays": b"\\x91" * depth + b"\\xc0",
            "tuples": b"\\x92\\xc7\\x00\\x01" * depth + b"\\xc0",
            "maps": b"\\x81\\xc0" * depth + b"\\xc0",
            "map keys": b"\\x81\\x92\\xc7\\x00\\x01" * depth + b"\\xc0" + b"\\xc0" * depth,
            "ext in ext": old,
        }}
        for name, stream in streams.items():
            entry = BufferEntry(0, False, len(stream), len(stream))
            header = Header(Kind(4), (entry,), b"").to_bytes()
            try:
                decode(header, [stream])
            except CodecError as e:
                print(name, "refused:", str(e)[:60])
            else:
                raise AssertionError(name + " decoded")
        """
    )
    assert out.count("refused:") == 5, out


# --- sizes --------------------------------------------------------------------------------------


def _forged(kind: Kind, entries: list[BufferEntry]) -> bytes:
    return Header(kind, tuple(entries), b"\0" if kind is Kind.BYTES else b"").to_bytes()


def test_one_tib_buffer_is_refused_before_allocating() -> None:
    header = _forged(Kind.BYTES, [BufferEntry(CODEC_NONE, False, TIB, TIB)])
    with _peak_memory() as peak:
        for check in (check_header, message_sizes):
            with pytest.raises(CodecError, match="max_message_bytes"):
                check(header)
        with pytest.raises(CodecError, match="max_message_bytes"):
            decode(header, [])
        with pytest.raises(CodecError, match="max_message_bytes"):
            loads(header)  # a stream reader would allocate after reading the header
    assert peak[0] < 1 << 20


def test_many_buffers_summing_past_the_limit_are_refused_before_allocating() -> None:
    gib = 1 << 30
    entries = [BufferEntry(CODEC_NONE, False, gib, gib)] * 1024  # each fine alone, 1 TiB in all
    header = _forged(Kind.TREE, entries)
    with _peak_memory() as peak:
        with pytest.raises(CodecError, match="max_message_bytes"):
            message_sizes(header)
        with pytest.raises(CodecError, match="max_message_bytes"):
            decode(header, [b""] * 1024)
    assert peak[0] < 1 << 20
    # Compressed entries: small as sent, 1 TiB once decompressed (within zstd's ratio).
    entries = [BufferEntry(CODEC_ZSTD, False, 1 << 24, 1 << 40)]
    with pytest.raises(CodecError, match="decompresses to"):
        check_header(_forged(Kind.BYTES, entries))
    # The limit is the receiver's to choose.
    small = [BufferEntry(CODEC_NONE, False, 600, 600), BufferEntry(CODEC_NONE, False, 600, 600)]
    with pytest.raises(CodecError, match="max_message_bytes=1000"):
        check_header(_forged(Kind.TREE, small), CodecOptions(max_message_bytes=1000))
    assert message_sizes(_forged(Kind.TREE, small)) == [600, 600]


def test_too_many_header_entries_are_refused() -> None:
    entries = [BufferEntry(CODEC_NONE, False, 0, 0)] * 65_537
    header = _forged(Kind.TREE, entries)
    with _peak_memory() as peak, pytest.raises(CodecError, match="max_buffers=65536"):
        check_header(header)
    assert peak[0] < 1 << 20  # refused from the count, before building the entries
    few = _forged(Kind.TREE, entries[:5])
    with pytest.raises(CodecError, match="max_buffers=4"):
        decode(few, [b""] * 5, CodecOptions(max_buffers=4))
    with pytest.raises(CodecError, match="max_buffers=4"):
        loads(few, CodecOptions(max_buffers=4))


def test_zstd_bomb_is_refused_at_the_limit_without_decompressing() -> None:
    size = 64 << 20
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(size))
    enc = _message(Kind.BYTES, bomb, CODEC_ZSTD, size)  # declared honestly
    frame = pack(enc)
    limit = CodecOptions(max_message_bytes=16 << 20)
    with _peak_memory() as peak:
        with pytest.raises(CodecError, match="max_message_bytes"):
            loads(frame, limit)
        with pytest.raises(CodecError, match="max_message_bytes"):
            decode(enc.header, enc.buffers, limit)
    assert peak[0] < 1 << 20
    assert len(loads(frame)) == size  # within the default limit it is a legitimate message


def test_zstd_never_writes_past_the_declared_length() -> None:
    data = zstandard.ZstdCompressor().compress(bytes(8 << 20))
    enc = _message(Kind.BYTES, data, CODEC_ZSTD, 1 << 20)  # understates by 7 MiB
    with _peak_memory() as peak, pytest.raises(CodecError, match="past the"):
        decode(enc.header, enc.buffers)
    assert peak[0] < 4 << 20


def test_decode_array_refuses_every_other_kind_before_decoding() -> None:
    for obj, options in (({"a": 1}, None), (b"x", None), ([Custom(1)], PICKLE)):
        enc = encode(obj, options or CodecOptions())
        kind = Header.parse(enc.header).kind.name.lower()
        with pytest.raises(CodecError, match=f"expected a tensor or array message, got a {kind}"):
            decode_array(enc.header, [], PICKLE)  # no buffers: none was looked at
    t = torch.arange(5.0)
    enc = encode(t)
    assert torch.equal(decode_array(enc.header, enc.buffers), t)


# --- fuzzing -----------------------------------------------------------------------------------

_keys = st.one_of(
    st.text(max_size=6),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.binary(max_size=8),
    st.tuples(st.integers(), st.text(max_size=3)),
)
_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**130), max_value=2**130),
    st.floats(),
    st.complex_numbers(),
    st.text(max_size=12),
    st.binary(max_size=24),
    st.binary(min_size=1024, max_size=1100),
    st.binary(max_size=12).map(bytearray),
    st.binary(max_size=12).map(memoryview),
    st.sampled_from([np.float16(1.5), np.int8(-3), np.uint64(2**64 - 1), np.bool_(True)]),
    tensors(max_side=3),
    arrays(max_side=3),
)
allowed_objects = st.recursive(
    _atoms,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(_keys, inner, max_size=4),
    ),
    max_leaves=20,
)


@FUZZ
@given(allowed_objects, st.sampled_from([None, "zstd", "lz4"]))
def test_allowed_objects_round_trip_exactly(obj: Any, compression: str | None) -> None:
    options = CodecOptions(compression=compression, min_compress_bytes=0)  # type: ignore[arg-type]
    assert same(loads(dumps(obj, options)), obj)


def _mutate(data: Any, frame: bytes) -> bytes:
    out = bytearray(frame)
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
    if how == "truncate":
        return bytes(out[: data.draw(st.integers(0, max(len(out) - 1, 0)))])
    if how == "insert":
        pos = data.draw(st.integers(0, len(out)))
        return bytes(out[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + out[pos:])
    end = int.from_bytes(frame[8:12], "little") if how == "header" else len(out)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, end - 1))
        out[pos] = data.draw(st.integers(0, 255))
    return bytes(out)


@FUZZ
@given(st.data())
def test_mutated_frames_raise_only_codec_errors(data: Any) -> None:
    obj = data.draw(allowed_objects)
    options = data.draw(st.sampled_from([CodecOptions(), CodecOptions(compression="zstd")]))
    frame = _mutate(data, dumps(obj, options))
    with suppress(CodecError):
        loads(frame)


_ext = st.builds(
    msgpack.ExtType, st.integers(0, 6), st.binary(max_size=20) | st.sampled_from([b"", b"\0" * 8])
) | st.builds(msgpack.Timestamp, st.integers(0, 2**32), st.integers(0, 999_999_999))
_documents = st.recursive(
    st.one_of(
        st.none(),
        st.integers(-(2**63), 2**64 - 1),
        st.text(max_size=4),
        st.binary(max_size=4),
        _ext,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(lambda items: [msgpack.ExtType(1, b""), *items]),
        st.dictionaries(
            st.one_of(st.none(), st.integers(-9, 9), st.text(max_size=3)), inner, max_size=3
        ),
    ),
    max_leaves=16,
)


@FUZZ
@given(_documents, st.integers(1, 8))
def test_hostile_tree_streams_raise_only_codec_errors(doc: Any, max_depth: int) -> None:
    stream = msgpack.packb(doc, use_bin_type=True)
    enc = _message(Kind.TREE, stream)
    with suppress(CodecError):
        decode(enc.header, enc.buffers, CodecOptions(max_depth=max_depth))


@FUZZ
@given(st.binary(max_size=96), st.integers(0, 4), st.integers(1, 4))
def test_random_headers_raise_only_codec_errors(blob: bytes, count: int, kind: int) -> None:
    blob += bytes(-len(blob) % 16)
    header = struct.pack("<4sBBBBII", b"CLCD", 1, kind, 0, 0, 16 + len(blob), count) + blob
    options = CodecOptions(max_message_bytes=1 << 20, allow_pickle=False)
    try:
        sizes = message_sizes(header, options)
    except CodecError:
        return
    with suppress(CodecError):
        decode(header, [bytes(n) for n in sizes], options)
