"""Wire framing: the header, its buffer table, and the one-frame ``pack``/``unpack`` form.

A message is a header plus zero or more raw buffers.  Transports may send the buffers separately
(scatter/gather I/O, no copy); ``pack`` simply concatenates them.  All integers are little-endian.

Header, fixed prefix (``FIXED_PREFIX`` = 16 bytes)::

    offset size field
    0      4    magic b"CLCD"
    4      1    version (1)
    5      1    kind: 1 array (tensor/ndarray), 2 bytes-like, 3 pickle-5, 4 tree (msgpack)
    6      1    pad: zero bytes at the end of the header (0..15)
    7      1    reserved, 0
    8      4    header_len: total header bytes, prefix and pad included (<= MAX_HEADER_BYTES)
    12     4    nbuffers

Then ``nbuffers`` entries of 17 bytes each::

    0      1    flags: bits 0-1 codec (0 none, 1 zstd, 2 lz4); bit 2 pickle-native buffer
    1      8    wire_len: bytes of this buffer as sent
    9      8    raw_len: bytes after decompression (== wire_len when codec is none)

Then the kind's body, then ``pad`` zero bytes so that ``header_len`` is a multiple of 16 and the
first buffer of a packed frame is aligned for every element type.

Body per kind:
  * array: a :class:`~collectives.codec.tensors.TensorMeta`; exactly one buffer (the data).
  * bytes: one byte, the original type (0 bytes, 1 bytearray, 2 memoryview); exactly one buffer.
  * pickle / tree: empty.  The last buffer is the pickle (or msgpack) stream; the others are the
    out-of-band data it refers to by index.  Keeping the stream out of the header means the header
    stays small however big the object graph is.

A packed frame is ``header || buffer 0 || buffer 1 ...`` with nothing in between, so a stream
reader can read ``FIXED_PREFIX`` bytes, then ``header_length`` bytes, then ``message_sizes``.

Receivers preallocate what a header announces, so :func:`check_header` (and everything built on
it: :func:`message_sizes`, :func:`unpack`, ``decode``) holds it to the receiver's
:class:`~collectives.codec.options.CodecOptions` limits first: at most ``max_buffers`` entries,
and at most ``max_message_bytes`` in all, both as sent and after decompression.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from collectives.errors import CodecError, RemoteProtocolError

from .options import DEFAULT, CodecOptions

if TYPE_CHECKING:
    from typing_extensions import Buffer

MAGIC = b"CLCD"
VERSION = 1
FIXED_PREFIX = 16
ALIGN = 16
MAX_HEADER_BYTES = 64 << 20
# Whatever the options say, no single buffer may claim more (check_header applies the real limit).
MAX_BUFFER_BYTES = 1 << 40

CODEC_NONE, CODEC_ZSTD, CODEC_LZ4 = 0, 1, 2
CODEC_NAMES = {"zstd": CODEC_ZSTD, "lz4": CODEC_LZ4}
# The most a codec can expand: zstd's best is an RLE block (4 bytes for 128 KiB), lz4's one byte
# per 255 of match.  A header announcing more than that is forged and must not make us allocate.
MAX_RATIO = {CODEC_ZSTD: 1 << 16, CODEC_LZ4: 256}
_FLAG_CODEC_MASK = 0x03
_FLAG_NATIVE = 0x04

_PREFIX = struct.Struct("<4sBBBBII")
_ENTRY = struct.Struct("<BQQ")


class Kind(IntEnum):
    ARRAY = 1
    BYTES = 2
    PICKLE = 3
    TREE = 4


_KIND_VALUES = frozenset(k.value for k in Kind)


@dataclass(frozen=True)
class BufferEntry:
    codec: int
    native: bool  # a pickle protocol-5 PickleBuffer, handed back to pickle in order
    wire_len: int
    raw_len: int


@dataclass(frozen=True)
class Header:
    kind: Kind
    entries: tuple[BufferEntry, ...]
    body: bytes

    @property
    def wire_sizes(self) -> list[int]:
        """Byte length of each buffer as sent."""
        return [e.wire_len for e in self.entries]

    def to_bytes(self) -> bytes:
        unpadded = FIXED_PREFIX + _ENTRY.size * len(self.entries) + len(self.body)
        pad = -unpadded % ALIGN
        total = unpadded + pad
        if total > MAX_HEADER_BYTES:
            raise CodecError(f"codec: header of {total} bytes exceeds {MAX_HEADER_BYTES}")
        parts = [_PREFIX.pack(MAGIC, VERSION, self.kind, pad, 0, total, len(self.entries))]
        for e in self.entries:
            flags = e.codec | (_FLAG_NATIVE if e.native else 0)
            parts.append(_ENTRY.pack(flags, e.wire_len, e.raw_len))
        parts += [self.body, bytes(pad)]
        return b"".join(parts)

    @classmethod
    def parse(cls, data: Buffer, max_buffers: int | None = None) -> Header:
        """The header's structure, checked; ``max_buffers`` is tested before any entry is read."""
        view = byte_view(data, "header")
        total = header_length(view[:FIXED_PREFIX])
        if view.nbytes != total:
            raise CodecError(f"codec: header is {view.nbytes} bytes but declares {total}")
        _, _, kind_code, pad, _, _, count = _PREFIX.unpack_from(view)
        if max_buffers is not None:
            _check_count(count, max_buffers)
        kind = Kind(kind_code)  # header_length validated it
        body_end = total - pad
        body_start = FIXED_PREFIX + _ENTRY.size * count
        if body_start > body_end:
            raise CodecError(f"codec: header too short for its {count} buffer entries")
        if any(view[body_end:total]):
            raise CodecError("codec: non-zero header padding")
        entries = tuple(_parse_entry(view, i) for i in range(count))
        header = cls(kind, entries, bytes(view[body_start:body_end]))
        header._check_layout()
        return header

    def _check_layout(self) -> None:
        count = len(self.entries)
        if self.kind in (Kind.ARRAY, Kind.BYTES):
            if count != 1 or self.entries[0].native:
                raise CodecError(f"codec: {self.kind.name.lower()} message needs one plain buffer")
            if self.kind is Kind.BYTES and len(self.body) != 1:
                raise CodecError("codec: bytes message body must be one type byte")
            return
        if count < 1 or self.entries[-1].native:
            raise CodecError(f"codec: {self.kind.name.lower()} message lacks its stream buffer")
        if self.body:
            raise CodecError(f"codec: unexpected {len(self.body)} body bytes in header")
        if self.kind is Kind.TREE and any(e.native for e in self.entries):
            raise CodecError("codec: tree message must not carry pickle buffers")


def _check_count(count: int, max_buffers: int) -> None:
    if count > max_buffers:
        raise CodecError(f"codec: message has {count} buffers, more than max_buffers={max_buffers}")


def _parse_entry(view: memoryview, index: int) -> BufferEntry:
    flags, wire_len, raw_len = _ENTRY.unpack_from(view, FIXED_PREFIX + _ENTRY.size * index)
    codec = flags & _FLAG_CODEC_MASK
    if flags & ~(_FLAG_CODEC_MASK | _FLAG_NATIVE) or codec not in (CODEC_NONE, *MAX_RATIO):
        raise CodecError(f"codec: buffer {index} has invalid flags {flags:#04x}")
    if wire_len > MAX_BUFFER_BYTES or raw_len > MAX_BUFFER_BYTES:
        raise CodecError(f"codec: buffer {index} declares an absurd size")
    if codec == CODEC_NONE and raw_len != wire_len:
        raise CodecError(f"codec: uncompressed buffer {index} has raw_len != wire_len")
    if codec != CODEC_NONE and raw_len > wire_len * MAX_RATIO[codec]:
        raise CodecError(f"codec: buffer {index} declares an impossible compression ratio")
    return BufferEntry(codec, bool(flags & _FLAG_NATIVE), wire_len, raw_len)


def byte_view(data: Buffer, what: str) -> memoryview:
    """A flat unsigned-byte view of ``data`` without copying; CodecError if that is impossible."""
    try:
        view = memoryview(data)
    except TypeError:
        raise CodecError(f"codec: {what} is not bytes-like ({type(data).__name__})") from None
    if not view.c_contiguous:
        raise CodecError(f"codec: {what} is not contiguous")
    if view.ndim == 1 and view.format == "B":
        return view
    return view.cast("B")


def header_length(prefix: Buffer) -> int:
    """Total header length announced by the first ``FIXED_PREFIX`` bytes of a header."""
    view = byte_view(prefix, "header prefix")
    if view.nbytes < FIXED_PREFIX:
        raise CodecError(f"codec: truncated header prefix ({view.nbytes} < {FIXED_PREFIX} bytes)")
    magic, version, kind, pad, reserved, total, count = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"codec: bad magic {magic!r} (not a collectives codec message)")
    if version != VERSION:
        raise CodecError(f"codec: unsupported codec version {version} (this side speaks {VERSION})")
    if kind not in _KIND_VALUES:
        raise CodecError(f"codec: unknown message kind {kind}")
    if reserved or pad >= ALIGN or total % ALIGN:
        raise CodecError("codec: malformed header prefix")
    if total > MAX_HEADER_BYTES:
        raise CodecError(f"codec: header length {total} exceeds MAX_HEADER_BYTES")
    if total < FIXED_PREFIX + _ENTRY.size * count + pad:
        raise CodecError(f"codec: header length {total} too small for {count} buffers")
    return int(total)


_HEADER_BODY_ROOM = 4096  # a tensor's metadata, and then some


def header_limit(options: CodecOptions = DEFAULT) -> int:
    """The longest codec header a receiver with ``options`` accepts: room for ``max_buffers``
    entries and a body.  Transports check an announced header length against it before they
    allocate room for the header itself."""
    room = FIXED_PREFIX + _ENTRY.size * options.max_buffers + _HEADER_BODY_ROOM
    return min(room, MAX_HEADER_BYTES)


def check_header_length(length: int, options: CodecOptions, src: int) -> int:
    """``length``, the codec header length rank ``src`` announced, once it is within
    :func:`header_limit`; :class:`RemoteProtocolError` otherwise (nothing is allocated)."""
    limit = header_limit(options)
    if length > limit:
        raise RemoteProtocolError(
            f"rank {src} announced a {length}-byte codec header (limit {limit}, from "
            f"CodecOptions.max_buffers={options.max_buffers})"
        )
    return length


def check_header(header: Buffer | Header, options: CodecOptions = DEFAULT) -> Header:
    """Parse a received header and hold it to ``options``' limits; CodecError if it breaks one.

    Only the header is read, and nothing it announces is allocated: call this before receiving or
    decompressing a message's buffers.  A :class:`Header` this returned earlier (kept by a
    receiver, :attr:`Encoded.checked`) is not parsed again, only held to ``options``' limits.
    """
    if isinstance(header, Header):
        parsed = header
        _check_count(len(parsed.entries), options.max_buffers)
    else:
        parsed = Header.parse(header, options.max_buffers)
    limit = options.max_message_bytes
    wire = sum(e.wire_len for e in parsed.entries)
    if wire > limit:
        raise CodecError(
            f"codec: message of {wire} bytes exceeds max_message_bytes={limit} (CodecOptions)"
        )
    raw = sum(e.raw_len for e in parsed.entries)
    if raw > limit:
        raise CodecError(
            f"codec: message decompresses to {raw} bytes, more than max_message_bytes={limit} "
            "(CodecOptions)"
        )
    return parsed


def message_sizes(header: Buffer, options: CodecOptions = DEFAULT) -> list[int]:
    """Byte length of each buffer as sent, checked by :func:`check_header`: safe to preallocate."""
    return check_header(header, options).wire_sizes


@dataclass
class Encoded:
    """An encoded message: a header and the raw buffers it describes."""

    header: bytes
    buffers: list[memoryview] = field(default_factory=list)
    # ``header`` as the receiving transport parsed and checked it (:func:`check_header`, with the
    # receiver's options), so that decoding does not parse it again; None: not checked yet.
    checked: Header | None = field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(b.nbytes for b in self.buffers)


def pack(enc: Encoded) -> bytes:
    """One contiguous frame: the header followed by every buffer."""
    return b"".join([enc.header, *enc.buffers])


def unpack(frame: Buffer, options: CodecOptions = DEFAULT) -> Encoded:
    """Split a packed frame into header and zero-copy buffer slices; strict about its length.

    The header is held to ``options``' limits (:func:`check_header`).
    """
    view = byte_view(frame, "frame")
    total = header_length(view[:FIXED_PREFIX])
    if view.nbytes < total:
        raise CodecError(f"codec: truncated frame ({view.nbytes} bytes, header alone is {total})")
    header = bytes(view[:total])
    buffers = []
    offset = total
    for size in message_sizes(header, options):
        end = offset + size
        if end > view.nbytes:
            raise CodecError(f"codec: truncated frame ({view.nbytes} bytes, need at least {end})")
        buffers.append(view[offset:end])
        offset = end
    if offset != view.nbytes:
        raise CodecError(f"codec: {view.nbytes - offset} trailing bytes after the frame")
    return Encoded(header, buffers)
