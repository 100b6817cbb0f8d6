"""Objects: the msgpack tree by default, pickle-5 with out-of-band buffers when allowed."""

from __future__ import annotations

import collections
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from collectives.codec import CodecOptions, Header, Kind, decode, dumps, encode, loads
from collectives.errors import CodecError

from .helpers import CI, Custom, objects, same

PICKLE = CodecOptions(allow_pickle=True)


def _kind(frame: bytes) -> Kind:
    return Header.parse(frame[: int.from_bytes(frame[8:12], "little")]).kind


@CI
@given(objects())
def test_tree_round_trip(obj: Any) -> None:
    frame = dumps(obj)
    assert same(loads(frame), obj)
    # Opting into pickle changes nothing for what fits the tree: a peer without it decodes it.
    assert dumps(obj, PICKLE) == frame
    assert same(loads(frame, PICKLE), obj)


@CI
@given(objects())
def test_pickle_round_trip(obj: Any) -> None:
    frame = dumps([obj, Custom(1)], PICKLE)
    assert _kind(frame) is Kind.PICKLE
    back = loads(frame, PICKLE)
    assert same(back[0], obj) and back[1] == Custom(1)


@pytest.mark.parametrize("options", [CodecOptions(), PICKLE], ids=["tree", "pickle"])
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
    if options.allow_pickle:
        obj["custom"] = [Custom(5)]  # forces pickle for the whole message
    back = loads(dumps(obj, options), options)
    if options.allow_pickle:
        assert back.pop("custom") == [Custom(5)]
        del obj["custom"]
    assert same(back, obj)


def test_tensor_data_never_enters_the_pickle_stream() -> None:
    big = torch.randn(256, 256)
    enc = encode({"a": big, "b": [big.numpy().copy(), b"z" * 100_000], "c": Custom(1)}, PICKLE)
    stream = enc.buffers[-1]
    assert stream.nbytes < 1000
    assert sorted(b.nbytes for b in enc.buffers[:-1]) == [100_000, 262_144, 262_144]


def test_same_object_twice_is_sent_once_and_stays_one_object() -> None:
    t = torch.arange(1000)
    for options, extra in ((CodecOptions(), None), (PICKLE, Custom(1))):
        enc = encode([t, t, {"again": t}, extra], options)
        assert len(enc.buffers) == 2
        back = decode(enc.header, enc.buffers, options)
        assert back[0] is back[1] is back[2]["again"]


def test_numpy_string_arrays_travel_as_native_pickle_buffers() -> None:
    a = np.array(["abc" * 200] * 10)
    enc = encode({"s": a}, PICKLE)
    assert len(enc.buffers) == 2 and enc.buffers[-1].nbytes < 500
    assert (decode(enc.header, enc.buffers, PICKLE)["s"] == a).all()


def test_pickle_handles_custom_classes_and_cycles() -> None:
    cyc: list[Any] = [Custom(3)]
    cyc.append(cyc)
    back = loads(dumps(cyc, PICKLE), PICKLE)
    assert back[0] == Custom(3) and back[1] is back
    # A cycle of plain lists has no tree form either: with pickle allowed, it is pickled.
    plain: list[Any] = [1]
    plain.append(plain)
    again = loads(dumps(plain, PICKLE), PICKLE)
    assert again[0] == 1 and again[1] is again


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
def test_default_refuses_other_types_naming_them_and_the_opt_in(bad: object) -> None:
    with pytest.raises(CodecError, match=r"cannot encode .* without pickle") as err:
        dumps(bad)
    assert "allow_pickle=True" in str(err.value) and "COMFY_CLUSTER_ALLOW_PICKLE=1" in str(
        err.value
    )
    names = {"frozenset", "set", "OrderedDict", "Custom", "complex", "ndarray", "MaskedArray"}
    names |= {"function", "builtin_function_or_method"}
    assert any(n in str(err.value) for n in names)


def test_default_refuses_cycles_and_surrogates() -> None:
    cyc: list[Any] = []
    cyc.append(cyc)
    with pytest.raises(CodecError, match="deeper than max_depth"):
        dumps(cyc)
    with pytest.raises(CodecError, match="allow_pickle"):
        dumps("\ud800")
    assert loads(dumps("\ud800", PICKLE), PICKLE) == "\ud800"


def test_default_decode_refuses_pickle_messages() -> None:
    frame = dumps({"x": Custom(1)}, PICKLE)
    with pytest.raises(CodecError, match="refusing a pickle message"):
        loads(frame)
    enc = encode([Custom(2)], PICKLE)
    with pytest.raises(CodecError, match="allow_pickle=True"):
        decode(enc.header, enc.buffers)


def test_tree_decode_refuses_what_no_encoder_writes() -> None:
    from collectives.codec.frames import CODEC_NONE, BufferEntry

    streams = [
        b"\xd6\xff\x00\x00\x00\x01",  # a msgpack Timestamp
        b"\xd4\x63\x00",  # unknown extension
        b"\xd4\x03\x00",  # complex of the wrong length
        b"\xc1",  # never used
        b"\xc7\x00\x01",  # a tuple mark outside its array
        b"\x92\xc0\xc7\x00\x01",  # ... not first in it
        b"\x81\xc7\x00\x01\xc0",  # ... as a dict key
        b"\xd5\x01\x91\xc0",  # the nested-document tuple form (no longer written)
        b"\x81\x90\xc0",  # a list as a dict key
        b"\x81\xc7\x10\x03" + bytes(16) + b"\xc0",  # a complex as a dict key
        b"\xc0\xc0",  # trailing data
    ]
    for stream in streams:
        entry = BufferEntry(CODEC_NONE, False, len(stream), len(stream))
        header = Header(Kind.TREE, (entry,), b"")
        with pytest.raises(CodecError):
            decode(header.to_bytes(), [stream])


def test_pickle_errors_are_codec_errors() -> None:
    with pytest.raises(CodecError, match="cannot pickle"):
        dumps(lambda: 1, PICKLE)
    from collectives.codec.frames import CODEC_NONE, BufferEntry

    stream = pickle.dumps(Custom(1))[:-3] + b"."
    header = Header(Kind.PICKLE, (BufferEntry(CODEC_NONE, False, len(stream), len(stream)),), b"")
    with pytest.raises(CodecError, match="pickle"):
        decode(header.to_bytes(), [stream], PICKLE)


@CI
@given(st.lists(st.integers(min_value=-(2**200), max_value=2**200), max_size=5))
def test_big_ints(values: list[int]) -> None:
    assert loads(dumps({"v": values})) == {"v": values}
