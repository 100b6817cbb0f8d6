"""Tensors and ndarrays: every dtype bit-exact, layouts, zero-copy, devices."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given

from collectives.codec import (
    CodecOptions,
    TensorMeta,
    alloc_buffer,
    decode,
    dumps,
    encode,
    loads,
    message_sizes,
    tensor_bytes,
)
from collectives.errors import CodecError

from .helpers import CI, TORCH_DTYPES, arrays, same, tensor_from_bytes, tensors

PICKLE = CodecOptions(allow_pickle=True)

# Bit patterns that a value-based comparison would miss: signed zero, NaN payloads, inf.
SPECIAL_F32 = struct.pack("<5I", 0x80000000, 0x7FC00001, 0xFFBADBAD, 0x7F800000, 0xFF800000)


def _receive(frame: bytes) -> tuple[bytes, list[memoryview]]:
    """What a transport does: read the header, allocate buffers, fill them."""
    from collectives.codec import unpack

    enc = unpack(frame)
    buffers = []
    for src, size in zip(enc.buffers, message_sizes(enc.header), strict=True):
        buf = alloc_buffer(size)
        buf[:] = src
        buffers.append(buf)
    return enc.header, buffers


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("how", ["fast", "pickle", "tree"])
def test_every_dtype_bit_exact(dtype: torch.dtype, how: str) -> None:
    data = np.random.default_rng(0).bytes(24 * dtype.itemsize)
    t = tensor_from_bytes(data, dtype, (2, 3, 4))
    if dtype == torch.float32:
        t = tensor_from_bytes(SPECIAL_F32 * 4, dtype, (4, 5))
    if how == "fast":
        back = loads(dumps(t))
    elif how == "pickle":
        back = loads(dumps({"t": [t], "s": {1}}, PICKLE), PICKLE)["t"][0]
    else:
        back = loads(dumps({"t": (t,)}))["t"][0]
    assert same(back, t)


@CI
@given(tensors())
def test_random_tensors_round_trip(t: torch.Tensor) -> None:
    assert same(loads(dumps(t)), t)
    back = loads(dumps([t, t.shape], PICKLE), PICKLE)  # torch.Size needs pickle
    assert same(back[0], t) and back[1] == t.shape


@CI
@given(arrays())
def test_random_arrays_round_trip(a: np.ndarray) -> None:
    back = loads(dumps(a))
    assert type(back) is np.ndarray and same(back, a)
    assert same(loads(dumps({"a": a}))["a"], a)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.t(),
        lambda x: x[::2, 1::3],
        lambda x: x[:, :1].expand(6, 5),
        lambda x: x.unsqueeze(0).expand(3, 6, 6)[:, 1:, 2:],
        lambda x: x.to(torch.complex64).conj(),
        lambda x: x.to(torch.complex64).conj().imag,
        lambda x: torch.ones(6, 6, requires_grad=True) * x,
    ],
    ids=[
        "transposed",
        "stepped",
        "expanded",
        "expanded-sliced",
        "conj",
        "neg-view",
        "requires-grad",
    ],
)
def test_non_contiguous_and_lazy_views(make: object) -> None:
    x = torch.arange(36, dtype=torch.float32).reshape(6, 6)
    t = make(x)  # type: ignore[operator]
    expected = t.detach().resolve_conj().resolve_neg().contiguous()
    for back in (
        loads(dumps(t)),
        loads(dumps({"k": t}))["k"],
        loads(dumps([t], PICKLE), PICKLE)[0],
    ):
        assert back.is_contiguous() and not back.requires_grad
        assert torch.equal(back, expected) and back.dtype == t.dtype


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (0, 0)])
def test_zero_d_and_zero_size_keep_shape(shape: tuple[int, ...]) -> None:
    t = torch.full(shape, 7, dtype=torch.bfloat16)
    assert same(loads(dumps(t)), t)
    assert same(loads(dumps({"x": t}))["x"], t)
    a = np.full(shape, 3, dtype=np.float16)
    assert same(loads(dumps(a)), a)
    assert tensor_bytes(t).nbytes == t.numel() * 2


def test_tensor_bytes_is_zero_copy_for_contiguous_cpu() -> None:
    t = torch.arange(10, dtype=torch.int32)
    view = tensor_bytes(t)
    assert view.format == "B" and view.ndim == 1 and view.nbytes == 40
    view[0] = 99
    assert t[0].item() == 99  # it really is the tensor's memory
    assert bytes(tensor_bytes(t.t())) == bytes(view)


def test_decode_wraps_writable_buffers_without_copy() -> None:
    t = torch.randn(64, 64)
    header, buffers = _receive(dumps(t))
    back = decode(header, buffers)
    assert back.data_ptr() == np.frombuffer(buffers[0], np.uint8).ctypes.data
    back[0, 0] = 1.0  # writable, no warning
    frame = bytearray(dumps(t))
    back = loads(frame)
    start = np.frombuffer(frame, np.uint8).ctypes.data
    assert start <= back.data_ptr() < start + len(frame) and torch.equal(back, t)


def test_decode_of_read_only_bytes_copies_once_and_is_writable() -> None:
    frame = dumps({"t": torch.randn(8, 8), "a": np.arange(9.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = loads(frame)
        back["t"] += 1
        back["a"] += 1
    assert back["a"].flags.owndata or back["a"].base is not None


def test_misaligned_buffer_is_copied_to_aligned_memory() -> None:
    t = torch.arange(16.0).to(torch.complex128)
    enc = encode(t)
    raw = bytearray(enc.buffers[0].nbytes + 1)
    raw[1:] = enc.buffers[0]
    back = decode(enc.header, [memoryview(raw)[1:]])
    assert back.data_ptr() % 16 == 0 and torch.equal(back, t)


def test_in_process_encode_decode_aliases_the_source() -> None:
    t = torch.zeros(4)
    enc = encode(t)
    assert decode(enc.header, enc.buffers).data_ptr() == t.data_ptr()


def test_big_endian_ndarray_decodes_to_same_values() -> None:
    a = np.arange(5, dtype=">f8") / 3
    back = loads(dumps(a))
    assert back.dtype == np.dtype("<f8") and np.array_equal(back, a)


def test_non_table_ndarrays_need_pickle() -> None:
    for a in (np.array(["x", "yz"]), np.array([1, None], dtype=object), np.arange(3).view("M8[s]")):
        back = loads(dumps(a, PICKLE), PICKLE)
        assert back.dtype == a.dtype and (back == a).all()
        with pytest.raises(CodecError, match=r"cannot encode numpy\.ndarray without pickle"):
            dumps(a)


def test_forged_bool_bytes_are_refused() -> None:
    frame = bytearray(dumps(torch.tensor([True, False])))
    frame[-1] = 2
    with pytest.raises(CodecError, match="bool"):
        loads(frame)


def test_shape_buffer_mismatch_is_refused() -> None:
    enc = encode(torch.zeros(4))
    with pytest.raises(CodecError):
        decode(enc.header, [memoryview(bytes(12))])


def test_tensor_meta_round_trip_and_validation() -> None:
    meta = TensorMeta("torch", "float8_e5m2", (2, 3), "cuda:1")
    assert TensorMeta.from_bytes(meta.to_bytes()) == meta
    assert meta.nbytes == 6
    raw = meta.to_bytes()
    for bad in (raw[:-1], raw + b"\0", b"\x07" + raw[1:], raw[:1] + b"\xee" + raw[2:]):
        with pytest.raises(CodecError):
            TensorMeta.from_bytes(bad)
    with pytest.raises(CodecError, match="device"):
        TensorMeta.from_bytes(TensorMeta("numpy", "int8", (1,), "cuda:0").to_bytes())


def _with_device(t: torch.Tensor, device: str) -> tuple[bytes, list[memoryview]]:
    from collectives.codec.frames import Header

    enc = encode(t)
    header = Header.parse(enc.header)
    meta = TensorMeta.from_bytes(header.body)
    forged = TensorMeta(meta.framework, meta.dtype, meta.shape, device)
    return Header(header.kind, header.entries, forged.to_bytes()).to_bytes(), enc.buffers


def test_recorded_device_missing_here_decodes_on_cpu() -> None:
    header, buffers = _with_device(torch.ones(3), "cuda:7")
    if torch.cuda.device_count() <= 7:
        assert decode(header, buffers).device.type == "cpu"
    back = decode(header, buffers, CodecOptions(map_location="cpu"))
    assert back.device.type == "cpu"
    header, buffers = _with_device(torch.ones(3), "mps")
    assert decode(header, buffers).device.type == "cpu"


@pytest.mark.gpu
def test_cuda_tensor_round_trip() -> None:
    t = torch.randn(5, 5, device="cuda:0").to(torch.bfloat16)
    back = loads(dumps({"t": t}))["t"]
    assert back.device == t.device and same(back.cpu(), t.cpu())
    assert loads(dumps(t), CodecOptions(map_location="cpu")).device.type == "cpu"


def test_unsupported_tensors_are_refused_on_encode() -> None:
    with pytest.raises(CodecError, match="dense"):
        dumps(torch.eye(3).to_sparse())
    with pytest.raises(CodecError, match="meta"):
        dumps(torch.empty(3, device="meta"))
