"""Safe mode: a msgpack tree, never pickle, on either side.

msgpack carries None, bool, int (64-bit), float, str, bytes, list and dict natively.  The rest use
extension types whose payload we parse ourselves:

    ==== ============ ===============================================================
    code name         payload
    ==== ============ ===============================================================
    1    tuple        a msgpack array of the items
    2    reference    an out-of-band reference (see ``refs``): tensor, ndarray, blob
    3    complex      two little-endian float64
    4    big int      signed little-endian two's complement (ints beyond 64 bits)
    5    numpy scalar dtype code byte, then the raw little-endian value
    ==== ============ ===============================================================

Decoded trees are checked again afterwards: msgpack itself would turn extension -1 into a
``Timestamp``, which is not a type safe mode promises.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np

from collectives.errors import CodecError

from . import dtypes, tensors
from .refs import OOB_MIN_BYTES, Collector, Resolver

EXT_TUPLE, EXT_REF, EXT_COMPLEX, EXT_BIGINT, EXT_NPSCALAR = 1, 2, 3, 4, 5
MAX_DEPTH = 256  # also catches reference cycles, which safe mode cannot express
_COMPLEX = struct.Struct("<dd")
_ATOMS = (str, bool, float, type(None))
_KEY_ATOMS = (str, bool, float, type(None), int, bytes)
_ALLOWED = (
    "tensors, numeric ndarrays and numpy scalars, bytes, bytearray, memoryview, str, int, "
    "float, complex, bool, None, and list/tuple/dict of them"
)


def _pack(tree: object) -> bytes:
    out: bytes = msgpack.packb(tree, use_bin_type=True, strict_types=True)
    return out


def _int(value: int) -> object:
    if -(1 << 63) <= value < 1 << 64:
        return value
    return msgpack.ExtType(
        EXT_BIGINT, value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    )


def _refuse(obj: object, where: str = "") -> CodecError:
    kind = type(obj)
    return CodecError(
        f"codec: safe mode cannot encode {kind.__module__}.{kind.__qualname__}{where}; "
        f"allowed: {_ALLOWED}"
    )


def _key(key: object, depth: int) -> object:
    kind = type(key)
    if isinstance(key, int) and kind is int:
        return _int(key)
    if kind in _KEY_ATOMS:
        return key
    if isinstance(key, tuple) and kind is tuple and depth < MAX_DEPTH:
        return msgpack.ExtType(EXT_TUPLE, _pack([_key(k, depth + 1) for k in key]))
    raise _refuse(key, " as a dict key")


def _tree(obj: object, out: Collector, depth: int) -> object:
    if depth > MAX_DEPTH:
        raise CodecError(f"codec: safe mode nesting deeper than {MAX_DEPTH} (a cycle?)")
    kind = type(obj)
    if kind in _ATOMS:
        return obj
    if isinstance(obj, int) and kind is int:
        return _int(obj)
    if isinstance(obj, list) and kind is list:
        return [_tree(x, out, depth + 1) for x in obj]
    if isinstance(obj, dict) and kind is dict:
        return {_key(k, depth + 1): _tree(v, out, depth + 1) for k, v in obj.items()}
    if isinstance(obj, tuple) and kind is tuple:
        return msgpack.ExtType(EXT_TUPLE, _pack([_tree(x, out, depth + 1) for x in obj]))
    if isinstance(obj, bytes) and kind is bytes and len(obj) < OOB_MIN_BYTES:
        return obj
    if isinstance(obj, bytes | bytearray | memoryview) and kind in (bytes, bytearray, memoryview):
        return msgpack.ExtType(EXT_REF, out.blob(obj))
    if isinstance(obj, complex) and kind is complex:
        return msgpack.ExtType(EXT_COMPLEX, _COMPLEX.pack(obj.real, obj.imag))
    if tensors.is_tensor(obj) or tensors.is_wire_array(obj):
        return msgpack.ExtType(EXT_REF, out.array(obj))
    if isinstance(obj, np.generic) and (entry := dtypes.numpy_dtype_for(obj.dtype)) is not None:
        raw = np.asarray(obj).astype(dtypes.numpy_dtype(entry)).tobytes()
        return msgpack.ExtType(EXT_NPSCALAR, bytes([entry.code]) + raw)
    raise _refuse(obj)


def dump(obj: object, out: Collector) -> bytes:
    tree = _tree(obj, out, 0)
    try:
        return _pack(tree)
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a str with lone surrogates
        raise CodecError(f"codec: safe mode cannot encode this object: {e}") from e


class _Loader:
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    def unpack(self, data: bytes | memoryview) -> Any:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True, ext_hook=self.ext
        )

    def ext(self, code: int, data: bytes) -> object:
        if code == EXT_TUPLE:
            items = self.unpack(data)
            if type(items) is not list:
                raise CodecError("codec: malformed tuple in safe message")
            return tuple(items)
        if code == EXT_REF:
            return self.resolver.resolve(data)
        if code == EXT_COMPLEX and len(data) == _COMPLEX.size:
            return complex(*_COMPLEX.unpack(data))
        if code == EXT_BIGINT and data:
            return int.from_bytes(data, "little", signed=True)
        if code == EXT_NPSCALAR and data:
            entry = dtypes.by_code(data[0])
            if len(data) == 1 + entry.itemsize and entry.numpy is not None:
                value = np.frombuffer(data, dtypes.numpy_dtype(entry), offset=1)[0]
                if entry.name != "bool" or data[1] <= 1:
                    return value
        raise CodecError(f"codec: malformed or unknown extension {code} in safe message")


_DECODED_ATOMS = frozenset(
    {str, int, float, bool, type(None), bytes, bytearray, memoryview, complex}
)


def _check(obj: object, depth: int = 0) -> None:
    if depth > MAX_DEPTH + 1:
        raise CodecError("codec: safe message nested too deeply")
    kind = type(obj)
    if kind in _DECODED_ATOMS or tensors.is_tensor(obj) or type(obj) is np.ndarray:
        return
    if isinstance(obj, list | tuple) and kind in (list, tuple):
        for item in obj:
            _check(item, depth + 1)
    elif isinstance(obj, dict) and kind is dict:
        for k, v in obj.items():
            _check(k, depth + 1)
            _check(v, depth + 1)
    elif not (isinstance(obj, np.generic) and dtypes.numpy_dtype_for(obj.dtype) is not None):
        raise CodecError(f"codec: safe message decoded to a forbidden {kind.__name__}")


def load(stream: memoryview, resolver: Resolver) -> object:
    try:
        obj = _Loader(resolver).unpack(stream)
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"codec: corrupt safe (msgpack) stream: {type(e).__name__}: {e}") from e
    _check(obj)
    resolver.finish()
    return obj
