"""encode/decode and their one-frame forms dumps/loads.

Nothing is pickled unless ``CodecOptions.allow_pickle`` says so.  A tensor, table-dtype ndarray
or bytes-like object travels as exactly one raw buffer; anything else is written as a msgpack tree
(:mod:`collectives.codec.tree`) when it fits one, which every receiver can decode.  Only with
``allow_pickle=True`` does an object that does not fit travel as pickle protocol 5, and only a
receiver with ``allow_pickle=True`` decodes that: unpickling runs code the sender chose.

Every decode first holds the header to the receiver's limits (:func:`check_header`) and refuses a
pickle message it did not opt into before reading any of the pickle stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from collectives.errors import CodecError

from . import compression, objects, tensors, tree
from .frames import (
    CODEC_NONE,
    BufferEntry,
    Encoded,
    Header,
    Kind,
    byte_view,
    check_header,
    pack,
    unpack,
)
from .options import ALLOW_PICKLE_ENV, DEFAULT, CodecOptions
from .refs import BLOB_TYPES, Collector, OutBuffer, Resolver, decode_blob

if TYPE_CHECKING:
    from typing_extensions import Buffer

PICKLE_HINT = (
    f"to send it anyway, opt in on every rank with CodecOptions(allow_pickle=True) or "
    f"{ALLOW_PICKLE_ENV}=1, which lets any peer that can reach a rank run code on it"
)


def encode(obj: object, options: CodecOptions = DEFAULT) -> Encoded:
    """Encode ``obj`` as a header plus raw buffers (zero-copy views where possible).

    CodecError, at the sender, for an object the tree cannot carry unless ``allow_pickle``.
    Buffers of an in-process encode alias the source data: decoding them without a transport in
    between yields tensors sharing memory with the originals.
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
    try:
        kind, stream = Kind.TREE, tree.dump(obj, collector, options.max_depth)
    except tree.Unfit as e:
        if not options.allow_pickle:
            raise CodecError(f"{e}; {PICKLE_HINT}") from None
        collector = Collector(options)  # drop what the tree attempt collected
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


def decode(
    header: Buffer | Header, buffers: Sequence[Buffer], options: CodecOptions = DEFAULT
) -> Any:
    """Rebuild the object from a header and its buffers; CodecError on anything malformed.

    The header is held to ``options``' limits before any buffer is touched, and a pickle message
    is refused unless ``options.allow_pickle``.  Writable buffers (bytearray, numpy,
    :func:`alloc_buffer`) are wrapped without copying; data in read-only buffers (bytes) is
    copied once so that results are writable.  ``header`` may be the :class:`Header` a receiver
    already checked (:attr:`Encoded.checked`): it is then not parsed again, only held to the
    limits.
    """
    parsed = check_header(header, options)
    if parsed.kind is Kind.PICKLE and not options.allow_pickle:
        raise CodecError(
            "codec: refusing a pickle message: unpickling would let the sender run code here; "
            f"accept them only from trusted peers with CodecOptions(allow_pickle=True) or "
            f"{ALLOW_PICKLE_ENV}=1"
        )
    return _decode(parsed, buffers, options)


def decode_array(
    header: Buffer | Header, buffers: Sequence[Buffer], options: CodecOptions = DEFAULT
) -> Any:
    """:func:`decode` for receive paths that expect one tensor or ndarray and nothing else.

    Any other kind of message is refused before a buffer is read or decompressed.
    """
    parsed = check_header(header, options)
    if parsed.kind is not Kind.ARRAY:
        raise CodecError(
            f"codec: expected a tensor or array message, got a {parsed.kind.name.lower()} message"
        )
    return _decode(parsed, buffers, options)


def _decode(parsed: Header, buffers: Sequence[Buffer], options: CodecOptions) -> Any:
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
    if parsed.kind is Kind.TREE:
        return tree.load(raws[-1], resolver, options.max_depth)
    return objects.load(raws[-1], resolver)


def dumps(obj: object, options: CodecOptions = DEFAULT) -> bytes:
    """``obj`` as one contiguous frame (``pack(encode(obj))``)."""
    return pack(encode(obj, options))


def loads(frame: Buffer, options: CodecOptions = DEFAULT) -> Any:
    """Decode one frame made by :func:`dumps` or :func:`pack`; strict about its length."""
    enc = unpack(frame, options)
    return decode(enc.header, enc.buffers, options)
