"""Arbitrary objects as pickle protocol 5, with tensors and arrays out of band (like mpi4py.pkl5).

``persistent_id`` replaces every torch tensor, every numpy array of a table dtype, every memoryview
and every bytes/bytearray of at least ``refs.OOB_MIN_BYTES`` with a small reference, so their data
never enters the pickle stream.  Other protocol-5 buffers (numpy string/datetime arrays ...) leave
through ``buffer_callback`` and are marked "native" in the header.

Only used with ``CodecOptions(allow_pickle=True)``, for objects the tree format cannot carry, and
only decoded by receivers that set it too: unpickling runs arbitrary code chosen by the sender, so
any peer that can reach such a rank can run code on it.
"""

from __future__ import annotations

import io
import pickle

from collectives.errors import CodecError

from .refs import Collector, Resolver


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, collector: Collector) -> None:
        super().__init__(file, protocol=5, buffer_callback=collector.pickle_buffer)
        self._collector = collector

    def persistent_id(self, obj: object) -> bytes | None:
        return self._collector.pickle_id(obj)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, resolver: Resolver) -> None:
        super().__init__(file, buffers=resolver.pickle_buffers())
        self._resolver = resolver

    def persistent_load(self, pid: object) -> object:
        return self._resolver.resolve(pid)


def dump(obj: object, collector: Collector) -> bytes:
    out = io.BytesIO()
    try:
        _Pickler(out, collector).dump(obj)
    except CodecError:
        raise
    except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as e:
        raise CodecError(f"codec: cannot pickle {type(obj).__name__}: {e}") from e
    return out.getvalue()


def load(stream: memoryview, resolver: Resolver) -> object:
    source = io.BytesIO(stream)
    try:
        obj = _Unpickler(source, resolver).load()
    except CodecError:
        raise
    except Exception as e:  # a corrupt stream can fail in any class's reconstructor
        raise CodecError(f"codec: corrupt pickle stream: {type(e).__name__}: {e}") from e
    if source.tell() != stream.nbytes:
        raise CodecError(f"codec: {stream.nbytes - source.tell()} bytes after the pickle stream")
    resolver.finish()
    return obj
