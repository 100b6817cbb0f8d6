"""Shared pieces of the codec tests: bit-exact comparison and hypothesis strategies."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from collectives.codec import tensor_bytes

# Derandomized so CI runs are reproducible; no deadline because CI machines stall.
CI = settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TORCH_DTYPES: list[torch.dtype] = [
    getattr(torch, name)
    for name in (
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "bfloat16",
        "complex32",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    if hasattr(torch, name)
]
NUMPY_DTYPES = ["?", "u1", "i1", "<i2", "<i4", "<i8", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8"]
NUMPY_DTYPES += ["<c8", "<c16", ">f4", ">i8"]


class Custom:
    """A class of the test's own: the codec needs pickle for it (allow_pickle)."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.x == self.x

    def __hash__(self) -> int:
        return self.x


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor holding exactly these bytes: every bit pattern, NaN payloads included."""
    if dtype == torch.bool:
        data = bytes(b & 1 for b in data)
    if not data:
        return torch.zeros(0, dtype=torch.uint8).view(dtype).reshape(shape)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn, max_side: int = 4) -> torch.Tensor:
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=3)))
    n = math.prod(shape) * dtype.itemsize
    return tensor_from_bytes(draw(st.binary(min_size=n, max_size=n)), dtype, shape)


@st.composite
def arrays(draw: st.DrawFn, max_side: int = 4) -> np.ndarray[Any, Any]:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=3)))
    n = math.prod(shape) * dtype.itemsize
    data = bytearray(draw(st.binary(min_size=n, max_size=n)))
    if dtype.kind == "b":
        data = bytearray(b & 1 for b in data)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _le_bytes(a: np.ndarray[Any, Any]) -> bytes:
    return a.astype(a.dtype.newbyteorder("<")).tobytes()


def same(a: Any, b: Any) -> bool:
    """Equal types and values, with floats and tensors compared bit by bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and bytes(tensor_bytes(a)) == bytes(tensor_bytes(b))
        )
    if isinstance(a, np.ndarray):
        return (
            a.dtype.kind == b.dtype.kind
            and a.dtype.itemsize == b.dtype.itemsize
            and a.shape == b.shape
            and _le_bytes(a) == _le_bytes(b)
        )
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, memoryview):
        return bytes(a) == bytes(b)
    if isinstance(a, np.generic):
        return bool(a.dtype == b.dtype and a.tobytes() == b.tobytes())
    return bool(a == b)


_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.binary(min_size=1020, max_size=1100),  # around the out-of-band threshold
    st.binary(max_size=30).map(bytearray),
    tensors(max_side=3),
    arrays(max_side=3),
)
_keys = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans())


def objects(atoms: st.SearchStrategy[Any] = _atoms) -> st.SearchStrategy[Any]:
    return st.recursive(
        atoms,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.lists(inner, max_size=4).map(tuple),
            st.dictionaries(_keys, inner, max_size=4),
        ),
        max_leaves=12,
    )
