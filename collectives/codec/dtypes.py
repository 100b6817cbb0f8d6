"""The dtype table: a stable one-byte code per element type, shared by torch and numpy.

Codes are part of the wire format: never renumber or reuse one, only append.  Decoders look a
code up here and refuse unknown codes, so a dtype is never recovered by parsing a name that came
off the wire.  The data on the wire is always little-endian.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from collectives.errors import CodecError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    code: int
    name: str  # the attribute name in torch (``torch.<name>``)
    itemsize: int
    numpy: str | None  # numpy's spelling, when numpy has the type


TABLE: tuple[DType, ...] = (
    DType(1, "bool", 1, "|b1"),
    DType(2, "uint8", 1, "|u1"),
    DType(3, "int8", 1, "|i1"),
    DType(4, "int16", 2, "<i2"),
    DType(5, "int32", 4, "<i4"),
    DType(6, "int64", 8, "<i8"),
    DType(7, "uint16", 2, "<u2"),
    DType(8, "uint32", 4, "<u4"),
    DType(9, "uint64", 8, "<u8"),
    DType(10, "float16", 2, "<f2"),
    DType(11, "float32", 4, "<f4"),
    DType(12, "float64", 8, "<f8"),
    DType(13, "complex64", 8, "<c8"),
    DType(14, "complex128", 16, "<c16"),
    DType(15, "bfloat16", 2, None),
    DType(16, "complex32", 4, None),
    DType(17, "float8_e4m3fn", 1, None),
    DType(18, "float8_e4m3fnuz", 1, None),
    DType(19, "float8_e5m2", 1, None),
    DType(20, "float8_e5m2fnuz", 1, None),
    DType(21, "float8_e8m0fnu", 1, None),
    DType(22, "float4_e2m1fn_x2", 1, None),  # two 4-bit values packed per byte
)

BY_CODE: dict[int, DType] = {d.code: d for d in TABLE}
BY_NAME: dict[str, DType] = {d.name: d for d in TABLE}
# numpy dtypes are matched on (kind, itemsize) so that aliases (intc, longlong, ...) all map.
_BY_NUMPY_KIND: dict[tuple[str, int], DType] = {
    (np.dtype(d.numpy).kind, d.itemsize): d for d in TABLE if d.numpy is not None
}
_torch_codes: dict[object, DType] | None = None

if sys.byteorder != "little":  # pragma: no cover - torch itself does not support such hosts
    raise ImportError("collectives.codec needs a little-endian host")


def by_code(code: int) -> DType:
    try:
        return BY_CODE[code]
    except KeyError:
        raise CodecError(f"codec: unknown dtype code {code}") from None


def numpy_dtype_for(dtype: np.dtype[np.generic]) -> DType | None:
    """The table entry of a plain numeric numpy dtype (either byte order), else None."""
    if dtype.fields is not None or dtype.subdtype is not None:
        return None
    return _BY_NUMPY_KIND.get((dtype.kind, dtype.itemsize))


def torch_dtype_for(dtype: torch.dtype) -> DType | None:
    global _torch_codes
    if _torch_codes is None:
        import torch

        _torch_codes = {getattr(torch, d.name): d for d in TABLE if hasattr(torch, d.name)}
    return _torch_codes.get(dtype)


def torch_dtype(entry: DType) -> torch.dtype:
    """The installed torch's dtype for a table entry; CodecError if this torch lacks it."""
    try:
        import torch
    except ImportError:
        raise CodecError(
            "codec: the message holds a torch tensor but torch is not installed here"
        ) from None
    found = getattr(torch, entry.name, None)
    if not isinstance(found, torch.dtype):
        raise CodecError(
            f"codec: dtype {entry.name} is not supported by the installed torch {torch.__version__}"
        )
    return found


def numpy_dtype(entry: DType) -> np.dtype[np.generic]:
    if entry.numpy is None:
        raise CodecError(f"codec: dtype {entry.name} has no numpy equivalent")
    return np.dtype(entry.numpy)
