"""Objects: pickle-5 with out-of-band buffers, and safe (msgpack) mode."""

from __future__ import annotations

import collections
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from collectives.codec import CodecOptions, decode, dumps, encode, loads
from collectives.errors import CodecError

from .helpers import CI, objects, same

SAFE = CodecOptions(safe=True)


class Custom:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.x == self.x

    def __hash__(self) -> int:
        return self.x


@CI
@given(objects())
def test_pickle_round_trip(obj: Any) -> None:
    assert same(loads(dumps(obj)), obj)


@CI
@given(objects())
def test_safe_round_trip(obj: Any) -> None:
    assert same(loads(dumps(obj, SAFE), SAFE), obj)
    # A safe message is not a pickle message: plain decoding reads it too.
    assert same(loads(dumps(obj, SAFE)), obj)


@pytest.mark.parametrize("options", [CodecOptions(), SAFE], ids=["pickle", "safe"])
def test_nested_mix(options: CodecOptions) -> None:
    obj = {
        "latent": {"samples": torch.randn(1, 4, 8, 8, dtype=torch.float16)},
        "images": [torch.rand(2, 4, 4, 3), None, np.arange(6, dtype=np.int16).reshape(2, 3)],
        "blob": b"\x00" * 5000,
        "small": b"xy",
        "ba": bytearray(b"q" * 2000),
        "mv": memoryview(b"abc"),
        "meta": (1, -2.5, "ok", True, None, 3 + 4j, 2**80),
        7: [[], {}, ()],
        (1, "k"): np.float32(1.5),
    }
    assert same(loads(dumps(obj, options), options), obj)


def test_tensor_data_never_enters_the_pickle_stream() -> None:
    big = torch.randn(256, 256)
    enc = encode({"a": big, "b": [big.numpy().copy(), b"z" * 100_000]})
    stream = enc.buffers[-1]
    assert stream.nbytes < 1000
    assert sorted(b.nbytes for b in enc.buffers[:-1]) == [100_000, 262_144, 262_144]


def test_same_object_twice_is_sent_once_and_stays_one_object() -> None:
    t = torch.arange(1000)
    for options in (CodecOptions(), SAFE):
        enc = encode([t, t, {"again": t}], options)
        assert len(enc.buffers) == 2
        back = decode(enc.header, enc.buffers, options)
        assert back[0] is back[1] is back[2]["again"]


def test_numpy_string_arrays_travel_as_native_pickle_buffers() -> None:
    a = np.array(["abc" * 200] * 10)
    enc = encode({"s": a})
    assert len(enc.buffers) == 2 and enc.buffers[-1].nbytes < 500
    assert (decode(enc.header, enc.buffers)["s"] == a).all()


def test_pickle_handles_custom_classes_and_cycles() -> None:
    cyc: list[Any] = [Custom(3)]
    cyc.append(cyc)
    back = loads(dumps(cyc))
    assert back[0] == Custom(3) and back[1] is back


def test_parameters_and_grad_decode_as_plain_tensors() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    for back in (loads(dumps(p)), loads(dumps([p]))[0]):
        assert type(back) is torch.Tensor and not back.requires_grad


@pytest.mark.parametrize(
    "bad",
    [
        Custom(1),
        {1, 2},
        frozenset(),
        collections.OrderedDict(a=1),
        [1, [2, {"k": Custom(2)}]],
        {Custom(1): 1},
        {3j: 1},
        np.array([None], dtype=object),
        np.ma.masked_array([1, 2]),
        lambda: 1,
        print,
    ],
    ids=lambda b: type(b).__name__,
)
def test_safe_mode_refuses_other_types_naming_them(bad: object) -> None:
    with pytest.raises(CodecError, match="safe mode cannot encode") as err:
        dumps(bad, SAFE)
    names = {"frozenset", "set", "OrderedDict", "Custom", "complex", "ndarray", "MaskedArray"}
    names |= {"function", "builtin_function_or_method"}
    assert any(n in str(err.value) for n in names)


def test_safe_mode_refuses_cycles_and_surrogates() -> None:
    cyc: list[Any] = []
    cyc.append(cyc)
    with pytest.raises(CodecError, match="deeper"):
        dumps(cyc, SAFE)
    with pytest.raises(CodecError):
        dumps("\ud800", SAFE)


def test_safe_decode_refuses_pickle_messages() -> None:
    frame = dumps({"x": 1})
    with pytest.raises(CodecError, match="safe mode"):
        loads(frame, SAFE)
    enc = encode([1])
    with pytest.raises(CodecError, match="safe mode"):
        decode(enc.header, enc.buffers, SAFE)


def test_safe_decode_refuses_msgpack_timestamps_and_unknown_extensions() -> None:
    from collectives.codec.frames import CODEC_NONE, BufferEntry, Header, Kind

    for stream in (b"\xd6\xff\x00\x00\x00\x01", b"\xd4\x63\x00", b"\xd4\x03\x00", b"\xc1"):
        header = Header(Kind.SAFE, (BufferEntry(CODEC_NONE, False, len(stream), len(stream)),), b"")
        with pytest.raises(CodecError):
            decode(header.to_bytes(), [stream], SAFE)


def test_pickle_errors_are_codec_errors() -> None:
    with pytest.raises(CodecError, match="cannot pickle"):
        dumps(lambda: 1)
    from collectives.codec.frames import CODEC_NONE, BufferEntry, Header, Kind

    stream = pickle.dumps(Custom(1))[:-3] + b"."
    header = Header(Kind.PICKLE, (BufferEntry(CODEC_NONE, False, len(stream), len(stream)),), b"")
    with pytest.raises(CodecError, match="pickle"):
        decode(header.to_bytes(), [stream])


@CI
@given(st.lists(st.integers(min_value=-(2**200), max_value=2**200), max_size=5))
def test_safe_big_ints(values: list[int]) -> None:
    assert loads(dumps({"v": values}, SAFE), SAFE) == {"v": values}
