"""Optional zstd/lz4: round trips, skipped when useless, corrupt data refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collectives.codec import CodecOptions, decode, dumps, encode, loads
from collectives.codec.frames import CODEC_NONE, Header
from collectives.errors import CodecError, ConfigurationError

from .helpers import same

CODECS = ["zstd", "lz4"]


def _codecs(enc_header: bytes) -> list[int]:
    return [e.codec for e in Header.parse(enc_header).entries]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("level", [None, 1, -1])
def test_round_trip_compresses_redundant_data(codec: str, level: int | None) -> None:
    options = CodecOptions(compression=codec, compression_level=level)  # type: ignore[arg-type]
    obj = {"z": torch.zeros(50_000), "bf": torch.ones(3000, dtype=torch.bfloat16), "b": b"a" * 9000}
    enc = encode(obj, options)
    assert enc.nbytes < 20_000
    assert CODEC_NONE not in _codecs(enc.header)[:3]
    # Decoding needs no option: the header says which buffers are compressed.
    assert same(decode(enc.header, enc.buffers), obj)
    for t in (torch.zeros(50_000), np.zeros(10_000), b"\0" * 10_000):
        assert same(loads(dumps(t, options)), t)


@pytest.mark.parametrize("codec", CODECS)
def test_skipped_when_useless_or_small(codec: str) -> None:
    options = CodecOptions(compression=codec)  # type: ignore[arg-type]
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 255, 100_000, dtype=np.uint8))
    small = torch.zeros(100)  # 400 bytes < min_compress_bytes
    enc = encode({"noise": noise, "small": small}, options)
    assert _codecs(enc.header) == [CODEC_NONE, CODEC_NONE, CODEC_NONE]
    assert enc.buffers[0].obj is not None and bytes(enc.buffers[0]) == noise.numpy().tobytes()
    assert same(decode(enc.header, enc.buffers), {"noise": noise, "small": small})
    enc = encode(torch.zeros(100), CodecOptions(compression=codec, min_compress_bytes=0))  # type: ignore[arg-type]
    assert _codecs(enc.header) != [CODEC_NONE]


def test_decompressed_tensors_are_writable_without_a_second_copy() -> None:
    back = loads(dumps(torch.zeros(10_000), CodecOptions(compression="zstd")))
    back += 1  # writable, and torch did not warn about non-writable memory


@pytest.mark.parametrize("codec", CODECS)
def test_corrupt_compressed_data_is_refused(codec: str) -> None:
    frame = bytearray(dumps(torch.zeros(10_000), CodecOptions(compression=codec)))  # type: ignore[arg-type]
    for pos in range(len(frame) - 40, len(frame), 7):
        bad = bytearray(frame)
        bad[pos] ^= 0xFF
        try:
            back = loads(bad)
        except CodecError:
            continue
        assert back.shape == (10_000,)  # a flip that survives must still give the right size


@pytest.mark.parametrize("codec", CODECS)
def test_declared_raw_length_must_match(codec: str) -> None:
    enc = encode(torch.zeros(10_000), CodecOptions(compression=codec))  # type: ignore[arg-type]
    header = bytearray(enc.header)
    for delta in (-4, 4):
        forged = bytearray(header)
        raw_len = int.from_bytes(header[25:33], "little") + delta
        forged[25:33] = raw_len.to_bytes(8, "little")
        with pytest.raises(CodecError):
            decode(bytes(forged), enc.buffers)


def test_invalid_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        CodecOptions(compression="gzip")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        CodecOptions(image_codec="jpeg")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        CodecOptions(min_compress_bytes=-1)
