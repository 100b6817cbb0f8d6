"""Out-of-band buffers of pickle and tree messages: collected on encode, resolved on decode.

An object stream (pickle or msgpack) refers to a buffer with a small reference payload::

    0  4  buffer index (little-endian)
    4  1  what: 0 tensor/ndarray (a TensorMeta follows), 1 blob (one type byte follows:
          0 bytes, 1 bytearray, 2 memoryview)

The same object met twice is sent once and decodes to one object, as pickle's memo would do.
Every buffer must be referenced, so a decoder notices buffers that a forged stream left out.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from collectives.errors import CodecError

from . import tensors
from .options import CodecOptions

_REF = struct.Struct("<IB")
REF_ARRAY, REF_BLOB = 0, 1
BLOB_TYPES: tuple[type[bytes | bytearray | memoryview], ...] = (bytes, bytearray, memoryview)
# Below this, a bytes object costs less inside the stream than as a separate buffer.
OOB_MIN_BYTES = 1024


@dataclass
class OutBuffer:
    view: memoryview
    native: bool
    compressible: bool


class Collector:
    """Encode side: gathers buffers and hands out reference payloads."""

    def __init__(self, options: CodecOptions) -> None:
        self.options = options
        self.buffers: list[OutBuffer] = []
        self._memo: dict[int, bytes] = {}
        self._alive: list[object] = []  # keeps memoised ids from being reused mid-encode

    def _add(self, obj: object, what: int, tail: bytes, view: memoryview, comp: bool) -> bytes:
        payload = _REF.pack(len(self.buffers), what) + tail
        self.buffers.append(OutBuffer(view, False, comp))
        self._memo[id(obj)] = payload
        self._alive.append(obj)
        return payload

    def array(self, obj: object) -> bytes:
        """Reference to a tensor or table-dtype ndarray."""
        known = self._memo.get(id(obj))
        if known is not None:
            return known
        meta, view, compressible = tensors.to_wire(obj, self.options)
        return self._add(obj, REF_ARRAY, meta.to_bytes(), view, compressible)

    def blob(self, obj: bytes | bytearray | memoryview) -> bytes:
        known = self._memo.get(id(obj))
        if known is not None:
            return known
        tag = BLOB_TYPES.index(type(obj))
        view = memoryview(obj)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        return self._add(obj, REF_BLOB, bytes([tag]), view.cast("B"), True)

    def pickle_id(self, obj: object) -> bytes | None:
        """``Pickler.persistent_id``: a reference for data that should travel out of band."""
        if isinstance(obj, bytes | bytearray | memoryview) and type(obj) in BLOB_TYPES:
            if type(obj) is memoryview or len(obj) >= OOB_MIN_BYTES:
                return self.blob(obj)
            return None  # small: in the stream (a bytearray via its own PickleBuffer reduce)
        if tensors.is_wire_array(obj) or tensors.is_tensor(obj):
            return self.array(obj)
        return None

    def pickle_buffer(self, buffer: pickle.PickleBuffer) -> bool:
        """``buffer_callback``: True keeps a small buffer in band, False moves it out."""
        view = buffer.raw()
        if view.nbytes < OOB_MIN_BYTES:
            return True
        self.buffers.append(OutBuffer(view, True, True))
        return False


class Resolver:
    """Decode side: turns reference payloads back into objects, checking every one."""

    def __init__(self, raws: list[memoryview], natives: list[bool], options: CodecOptions):
        self._raws = raws
        self._natives = natives
        self._options = options
        self._done: dict[int, tuple[bytes, object]] = {}
        self._native_used = 0

    def resolve(self, payload: object) -> object:
        if not isinstance(payload, bytes) or len(payload) < _REF.size:
            raise CodecError("codec: malformed out-of-band reference")
        index, what = _REF.unpack_from(payload)
        if index >= len(self._raws) or self._natives[index]:
            raise CodecError(f"codec: reference to missing buffer {index}")
        if index in self._done:
            seen, obj = self._done[index]
            if seen != payload:
                raise CodecError(f"codec: buffer {index} referenced with conflicting metadata")
            return obj
        tail, raw = payload[_REF.size :], self._raws[index]
        if what == REF_ARRAY:
            obj = tensors.from_wire(tensors.TensorMeta.from_bytes(tail), raw, self._options)
        elif what == REF_BLOB and len(tail) == 1:
            obj = decode_blob(tail[0], raw)
        else:
            raise CodecError(f"codec: malformed reference to buffer {index}")
        self._done[index] = (payload, obj)
        return obj

    def pickle_buffers(self) -> Iterator[memoryview]:
        """The native (PickleBuffer) buffers in order, writable so arrays built on them are."""
        for index, native in enumerate(self._natives):
            if native:
                self._native_used += 1
                yield tensors.writable_bytes(self._raws[index]).data

    def finish(self) -> None:
        plain = sum(not n for n in self._natives)
        if len(self._done) != plain or self._native_used != len(self._natives) - plain:
            raise CodecError("codec: message carries buffers its stream never refers to")


def decode_blob(tag: int, raw: memoryview) -> object:
    """Rebuild a bytes-like object of type ``BLOB_TYPES[tag]`` from its received buffer."""
    if tag >= len(BLOB_TYPES):
        raise CodecError(f"codec: unknown bytes type {tag}")
    kind = BLOB_TYPES[tag]
    if kind is bytes:
        whole = raw.obj
        # A received bytes object that is exactly this buffer can be returned as is.
        if isinstance(whole, bytes) and len(whole) == raw.nbytes:
            return whole
        return bytes(raw)
    if kind is bytearray:
        return bytearray(raw)
    return raw
