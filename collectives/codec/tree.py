"""The tree format: an object as one msgpack document; nothing is pickled on either side.

msgpack carries None, bool, int (64-bit), float, str, bytes, list and dict natively.  The rest use
extension types whose payload we parse ourselves:

    ==== ============ ===============================================================
    code name         payload
    ==== ============ ===============================================================
    1    tuple mark   empty; the first item of an array that decodes as a tuple
    2    reference    an out-of-band reference (see ``refs``): tensor, ndarray, blob
    3    complex      two little-endian float64
    4    big int      signed little-endian two's complement (ints beyond 64 bits)
    5    numpy scalar dtype code byte, then the raw little-endian value
    ==== ============ ===============================================================

A tuple is the array ``[mark, *items]`` rather than an extension wrapping a second document, so a
whole message is parsed by ONE call of msgpack's C parser.  That parser keeps its nesting on an
explicit, fixed-size stack and raises when a frame goes deeper, instead of recursing; a
``list_hook`` turns marked arrays back into tuples as they complete.

Neither side recurses in Python: the encoder walks the object with an explicit stack, refusing
nesting beyond ``CodecOptions.max_depth`` (which also catches cycles), and the decoder walks the
parsed tree the same way, refusing depth beyond the same option and every type the encoder would
not have produced (msgpack itself turns extension -1 into a ``Timestamp``, for one).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numpy as np
from msgpack.exceptions import StackError

from collectives.errors import CodecError

from . import dtypes, tensors
from .refs import OOB_MIN_BYTES, Collector, Resolver

EXT_TUPLE, EXT_REF, EXT_COMPLEX, EXT_BIGINT, EXT_NPSCALAR = 1, 2, 3, 4, 5
_COMPLEX = struct.Struct("<dd")
_TUPLE_MARK = msgpack.ExtType(EXT_TUPLE, b"")
_CONTAINERS = (list, tuple, dict)
_ATOMS = (str, bool, float, type(None))
_KEY_ATOMS = frozenset({str, bool, float, type(None), int, bytes})
# Decoded leaves of these exact types are allowed as keys and as values alike: check() passes over
# them where it meets them instead of stacking each one.
_PLAIN_DECODED = _KEY_ATOMS
# Leaves of these exact types the encoder writes as themselves, as keys and as values alike; so
# are an int in msgpack's range and bytes below the out-of-band size (see _leaf).
_PLAIN = frozenset({str, float, bool, type(None)})
_INTS = frozenset({int, bool})
_INT_MIN, _INT_END = -(1 << 63), 1 << 64
_VALUE_ATOMS = frozenset({str, int, float, bool, type(None), bytes, bytearray, memoryview, complex})
ALLOWED = (
    "tensors, numeric ndarrays and numpy scalars, bytes, bytearray, memoryview, str, int, "
    "float, complex, bool, None, and list/tuple/dict of them"
)


class Unfit(CodecError):
    """The object cannot be written as a tree (a type, its depth, or a str msgpack refuses)."""


def _describe(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _refuse(obj: object, where: str = "") -> Unfit:
    return Unfit(
        f"codec: cannot encode {_describe(type(obj))}{where} without pickle; allowed: {ALLOWED}"
    )


def _too_deep(max_depth: int, why: str = "") -> str:
    return f"codec: nesting deeper than max_depth={max_depth} (CodecOptions.max_depth){why}"


# --- encode -------------------------------------------------------------------------------------


class _Pending:
    """A tensor, array or blob whose reference is made while packing, once the walk succeeded."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj


@dataclass(slots=True)
class _Open:
    """A container being converted: its converted items so far and the originals still to do."""

    kind: type
    items: list[object]
    todo: Iterator[Any]
    in_key: bool
    depth: int

    def close(self) -> object:
        if self.kind is list:
            return self.items
        if self.kind is tuple:
            return tuple(self.items)
        pairs = dict(zip(self.items[::2], self.items[1::2], strict=True))
        if len(pairs) * 2 != len(self.items):  # distinct keys that encode equal
            raise Unfit("codec: dict keys collide once encoded")
        return pairs


def _int(value: int) -> object:
    if _INT_MIN <= value < _INT_END:
        return value
    return msgpack.ExtType(
        EXT_BIGINT, value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    )


def _leaf(obj: object, in_key: bool) -> object:
    kind = type(obj)
    if kind in _ATOMS:
        return obj
    if isinstance(obj, int) and kind is int:
        return _int(obj)
    if isinstance(obj, bytes) and kind is bytes and (in_key or len(obj) < OOB_MIN_BYTES):
        return obj
    if in_key:
        raise _refuse(obj, " as a dict key")
    if kind in (bytes, bytearray, memoryview) or tensors.is_tensor(obj):
        return _Pending(obj)
    if tensors.is_wire_array(obj):
        return _Pending(obj)
    if isinstance(obj, complex) and kind is complex:
        return msgpack.ExtType(EXT_COMPLEX, _COMPLEX.pack(obj.real, obj.imag))
    if isinstance(obj, np.generic) and (entry := dtypes.numpy_dtype_for(obj.dtype)) is not None:
        raw = np.asarray(obj).astype(dtypes.numpy_dtype(entry)).tobytes()
        return msgpack.ExtType(EXT_NPSCALAR, bytes([entry.code]) + raw)
    raise _refuse(obj)


def _all_plain(items: Collection[object]) -> bool:
    """Whether every item is written as itself, as a key or a value; tested in C, not per item."""
    kinds = set(map(type, items))
    if kinds <= _PLAIN:
        return True
    if kinds <= _INTS:  # not empty here: ints and bools, which compare
        ints = cast("Collection[int]", items)
        return min(ints) >= _INT_MIN and max(ints) < _INT_END
    return False


def _visit(
    obj: object, into: list[object], stack: list[_Open], *, in_key: bool, depth: int, limit: int
) -> bool:
    """Convert ``obj`` into ``into``, or open it on ``stack`` (``depth``: its parent's).

    True when a container was opened: its items are still to convert.
    """
    kind = type(obj)
    if kind not in _CONTAINERS:
        into.append(_leaf(obj, in_key))
        return False
    if in_key and kind is not tuple:
        raise _refuse(obj, " as a dict key")
    if depth >= limit:
        raise Unfit(_too_deep(limit, "; a reference cycle?"))
    todo: Iterator[Any]
    if isinstance(obj, dict):
        if _all_plain(obj) and _all_plain(obj.values()):
            into.append(dict(obj))  # what closing it would build; keys cannot collide
            return False
        todo = itertools.chain.from_iterable(obj.items())  # key, value, key, value ...
    else:
        seq = cast("list[object] | tuple[object, ...]", obj)
        if _all_plain(seq):
            into.append(list(seq) if kind is list else (_TUPLE_MARK, *seq))
            return False
        todo = iter(seq)
    first: list[object] = [_TUPLE_MARK] if kind is tuple else []
    stack.append(_Open(kind, first, todo, in_key, depth + 1))
    return True


def to_tree(obj: object, max_depth: int) -> object:
    """``obj`` with every container rebuilt in msgpack terms; Unfit if it has no tree form.

    Tensors, arrays and large bytes are left as placeholders for :func:`dump` to resolve.
    """
    root: list[object] = []
    stack: list[_Open] = []
    _visit(obj, root, stack, in_key=False, depth=0, limit=max_depth)
    while stack:
        top = stack[-1]
        items = top.items
        for child in top.todo:
            kind = type(child)
            # What _leaf would return unchanged, as a key or a value, is taken here without a call.
            if (
                kind in _PLAIN
                or (kind is int and _INT_MIN <= child < _INT_END)
                or (kind is bytes and len(child) < OOB_MIN_BYTES)
            ):
                items.append(child)
                continue
            # In a dict the items alternate key, value: an even count means a key comes next.
            in_key = top.in_key or (top.kind is dict and len(items) % 2 == 0)
            if _visit(child, items, stack, in_key=in_key, depth=top.depth, limit=max_depth):
                break  # convert the container just opened; this one resumes after it closes
        else:
            stack.pop()
            (stack[-1].items if stack else root).append(top.close())
    return root[0]


def dump(obj: object, out: Collector, max_depth: int) -> bytes:
    """The msgpack document of ``obj``; its tensors, arrays and large bytes go to ``out``."""
    tree = to_tree(obj, max_depth)

    def reference(pending: object) -> object:
        if not isinstance(pending, _Pending):
            raise TypeError(f"unexpected {type(pending).__name__}")  # to_tree produced no such
        target = pending.obj
        if isinstance(target, bytes | bytearray | memoryview):
            return msgpack.ExtType(EXT_REF, out.blob(target))
        return msgpack.ExtType(EXT_REF, out.array(target))

    try:
        packed: bytes = msgpack.packb(tree, use_bin_type=True, default=reference)
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a str with lone surrogates
        raise Unfit(f"codec: cannot encode this object without pickle: {e}") from e
    return packed


# --- decode -------------------------------------------------------------------------------------


class _Mark:
    """What the tuple extension decodes to; only ``list_hook`` may consume it."""

    __slots__ = ()


_MARK = _Mark()


def _tuples(items: list[object]) -> object:
    if items and items[0] is _MARK:
        del items[0]
        return tuple(items)
    return items


def _ext_hook(resolver: Resolver) -> Any:
    def ext(code: int, data: bytes) -> object:
        if code == EXT_TUPLE and not data:
            return _MARK
        if code == EXT_REF:
            return resolver.resolve(data)
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
        raise CodecError(f"codec: malformed or unknown extension {code} in tree message")

    return ext


def _allowed_leaf(obj: object, in_key: bool) -> bool:
    kind = type(obj)
    if in_key:
        return kind in _KEY_ATOMS
    if kind in _VALUE_ATOMS or kind is np.ndarray or tensors.is_tensor(obj):
        return True
    return isinstance(obj, np.generic) and dtypes.numpy_dtype_for(obj.dtype) is not None


def check(obj: object, max_depth: int) -> None:
    """Refuse a decoded tree deeper than ``max_depth`` or holding what no encoder writes."""
    stack: list[tuple[object, bool, int]] = [(obj, False, 0)]
    while stack:
        item, in_key, depth = stack.pop()
        kind = type(item)
        if kind not in _CONTAINERS:
            if not _allowed_leaf(item, in_key):
                where = " as a dict key" if in_key else ""
                raise CodecError(
                    f"codec: tree message decoded to a forbidden {kind.__name__}{where}"
                )
            continue
        if in_key and kind is not tuple:
            raise CodecError(f"codec: tree message has a {kind.__name__} as a dict key")
        if depth >= max_depth:
            raise CodecError(_too_deep(max_depth))
        depth += 1
        # Plain atoms are allowed as keys and values at any depth: only the rest is stacked, in
        # the same order as before, so the same fault is met first.  issuperset tests in C.
        if isinstance(item, dict):
            if not _PLAIN_DECODED.issuperset(map(type, item)):
                stack.extend([(k, True, depth) for k in item if type(k) not in _PLAIN_DECODED])
            values = item.values()
            if not _PLAIN_DECODED.issuperset(map(type, values)):
                stack.extend([(v, False, depth) for v in values if type(v) not in _PLAIN_DECODED])
        else:
            seq = cast("list[object] | tuple[object, ...]", item)
            if not _PLAIN_DECODED.issuperset(map(type, seq)):
                stack.extend([(x, in_key, depth) for x in seq if type(x) not in _PLAIN_DECODED])


def load(stream: memoryview, resolver: Resolver, max_depth: int) -> object:
    try:
        obj = msgpack.unpackb(
            stream,
            raw=False,
            strict_map_key=False,
            use_list=True,
            list_hook=_tuples,
            ext_hook=_ext_hook(resolver),
        )
    except CodecError:
        raise
    except StackError:
        raise CodecError(_too_deep(max_depth, ", past what msgpack's parser holds")) from None
    except Exception as e:  # msgpack's, ExtraData, unhashable keys, bad UTF-8 ...
        raise CodecError(f"codec: corrupt tree (msgpack) stream: {type(e).__name__}: {e}") from e
    check(obj, max_depth)
    resolver.finish()
    return obj
