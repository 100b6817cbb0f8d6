"""encode/decode and their one-frame forms dumps/loads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from collectives.errors import CodecError

from . import compression, objects, safe, tensors
from .frames import CODEC_NONE, BufferEntry, Encoded, Header, Kind, byte_view, pack, unpack
from .options import DEFAULT, CodecOptions
from .refs import BLOB_TYPES, Collector, OutBuffer, Resolver, decode_blob

if TYPE_CHECKING:
    from typing_extensions import Buffer


def encode(obj: object, options: CodecOptions = DEFAULT) -> Encoded:
    """Encode ``obj`` as a header plus raw buffers (zero-copy views where possible).

    A tensor, table-dtype ndarray or bytes-like object is sent without pickle, as exactly one
    buffer.  Anything else is pickled (protocol 5, tensors out of band) or, with ``safe=True``,
    written as msgpack.  Buffers of an in-process encode alias the source data: decoding them
    without a transport in between yields tensors sharing memory with the originals.
    """
    if tensors.is_tensor(obj) or tensors.is_wire_array(obj):
        meta, view, compressible = tensors.to_wire(obj, options)
        return _finish(Kind.ARRAY, meta.to_bytes(), [OutBuffer(view, False, compressible)], options)
    if isinstance(obj, bytes | bytearray | memoryview) and type(obj) in BLOB_TYPES:
        view = memoryview(obj)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        body = bytes([BLOB_TYPES.index(type(obj))])
        return _finish(Kind.BYTES, body, [OutBuffer(view.cast("B"), False, True)], options)
    collector = Collector(options)
    if options.safe:
        kind, stream = Kind.SAFE, safe.dump(obj, collector)
    else:
        kind, stream = Kind.PICKLE, objects.dump(obj, collector)
    buffers = [*collector.buffers, OutBuffer(memoryview(stream), False, True)]
    return _finish(kind, b"", buffers, options)


def _finish(kind: Kind, body: bytes, buffers: list[OutBuffer], options: CodecOptions) -> Encoded:
    entries = []
    views = []
    for out in buffers:
        codec, wire = CODEC_NONE, out.view
        if out.compressible and (packed := compression.compress(out.view, options)) is not None:
            codec, wire = packed
        entries.append(BufferEntry(codec, out.native, wire.nbytes, out.view.nbytes))
        views.append(wire)
    return Encoded(Header(kind, tuple(entries), body).to_bytes(), views)


def decode(header: Buffer, buffers: Sequence[Buffer], options: CodecOptions = DEFAULT) -> Any:
    """Rebuild the object from a header and its buffers; CodecError on anything malformed.

    Writable buffers (bytearray, numpy, :func:`alloc_buffer`) are wrapped without copying; data in
    read-only buffers (bytes) is copied once so that results are writable.
    """
    parsed = Header.parse(header)
    if parsed.kind is Kind.PICKLE and options.safe:
        raise CodecError("codec: refusing a pickle message in safe mode (CodecOptions.safe=True)")
    if len(buffers) != len(parsed.entries):
        raise CodecError(f"codec: header lists {len(parsed.entries)} buffers, got {len(buffers)}")
    raws = []
    for index, (entry, data) in enumerate(zip(parsed.entries, buffers, strict=True)):
        view = byte_view(data, f"buffer {index}")
        if view.nbytes != entry.wire_len:
            raise CodecError(
                f"codec: buffer {index} is {view.nbytes} bytes, header says {entry.wire_len}"
            )
        if entry.codec != CODEC_NONE:
            view = compression.decompress(entry.codec, view, entry.raw_len)
        raws.append(view)
    if parsed.kind is Kind.ARRAY:
        return tensors.from_wire(tensors.TensorMeta.from_bytes(parsed.body), raws[0], options)
    if parsed.kind is Kind.BYTES:
        return decode_blob(parsed.body[0], raws[0])
    resolver = Resolver(raws[:-1], [e.native for e in parsed.entries[:-1]], options)
    if parsed.kind is Kind.SAFE:
        return safe.load(raws[-1], resolver)
    return objects.load(raws[-1], resolver)


def dumps(obj: object, options: CodecOptions = DEFAULT) -> bytes:
    """``obj`` as one contiguous frame (``pack(encode(obj))``)."""
    return pack(encode(obj, options))


def loads(frame: Buffer, options: CodecOptions = DEFAULT) -> Any:
    """Decode one frame made by :func:`dumps` or :func:`pack`; strict about its length."""
    enc = unpack(frame)
    return decode(enc.header, enc.buffers, options)
