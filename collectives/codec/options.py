"""Encoding and decoding options, with the limits a decoder enforces on what peers send."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from collectives.errors import ConfigurationError

ALLOW_PICKLE_ENV = "COMFY_CLUSTER_ALLOW_PICKLE"
# msgpack's C parser keeps a fixed 1024-entry stack (a map holds two); staying at half of it means
# every depth an encoder accepts is one the other side can parse.
MAX_DEPTH_LIMIT = 512


@dataclass(frozen=True)
class CodecOptions:
    """How to encode and decode a message.

    ``allow_pickle``: False by default, and then nothing is ever pickled or unpickled.  Messages
    carry tensors of every torch dtype, numpy arrays of table dtypes, numeric numpy scalars,
    bytes/bytearray/memoryview, str, int (any size), float, complex, bool, None and list/tuple/dict
    of them, nested, by exact type; dict keys may be str, int, float, bool, None, bytes or tuples
    of those.  Anything else (subclasses, sets, custom classes ...) is refused at the sender with
    a :class:`~collectives.errors.CodecError` naming the type, and a pickle message from a peer
    is refused before any of it is read.  ``allow_pickle=True`` (or ``COMFY_CLUSTER_ALLOW_PICKLE=1``
    through :meth:`CommOptions.from_env <collectives.options.CommOptions.from_env>`) pickles what
    does not fit (protocol 5, tensors out of band) and unpickles what peers send: any peer that
    can reach a rank can then run code on it.  Objects that fit the tree are still sent as a tree,
    so a peer that did not opt in decodes them.

    Limits, enforced on decode before anything is allocated or decompressed (and ``max_depth``
    on encode too), each a :class:`~collectives.errors.CodecError` when exceeded:

    * ``max_depth`` (256, at most 512): nesting of lists, tuples and dicts (``[[1]]`` is 2 deep).
      With ``allow_pickle``, an object nested deeper (a reference cycle, say) is pickled instead;
      pickle messages are not measured.
    * ``max_message_bytes`` (4 GiB): the sum of every buffer's size as sent, and separately the
      sum of every buffer's size after decompression.
    * ``max_buffers`` (65,536): buffers in one message (tensors, arrays and large bytes each
      travel as one).

    ``compression``: compress each out-of-band buffer of at least ``min_compress_bytes`` with zstd
    or lz4, and keep the result only if it is smaller.  ``compression_level`` is the zstd level;
    for lz4 a positive level selects high-compression mode and a negative one the fast mode with
    that acceleration.  Decoding needs no option: the header flags each buffer.

    ``image_codec="png"``: LOSSY, opt-in.  Torch floating tensors shaped ``[B, H, W, C]`` with C in
    (1, 3, 4) travel as one 8-bit PNG per image (values clamped to [0, 1], NaN as 0, rounded to a
    multiple of 1/255) and decode to the original dtype and shape.  Nothing else is affected.

    ``map_location``: device for decoded tensors.  ``None`` means the device recorded by the
    sender when it exists here (``cuda:N`` with N < device_count), else cpu.
    """

    allow_pickle: bool = False
    compression: Literal["zstd", "lz4"] | None = None
    compression_level: int | None = None
    min_compress_bytes: int = 4096
    image_codec: Literal["png"] | None = None
    map_location: str | None = None
    max_depth: int = 256
    max_message_bytes: int = 4 << 30
    max_buffers: int = 65536

    def __post_init__(self) -> None:
        if self.compression not in (None, "zstd", "lz4"):
            raise ConfigurationError(
                f"CodecOptions.compression must be None, 'zstd' or 'lz4', not {self.compression!r}"
            )
        if self.image_codec not in (None, "png"):
            raise ConfigurationError(
                f"CodecOptions.image_codec must be None or 'png', not {self.image_codec!r}"
            )
        if self.min_compress_bytes < 0:
            raise ConfigurationError("CodecOptions.min_compress_bytes must be >= 0")
        _check_int("max_depth", self.max_depth, 1, MAX_DEPTH_LIMIT)
        _check_int("max_message_bytes", self.max_message_bytes, 0, 1 << 62)
        _check_int("max_buffers", self.max_buffers, 1, 1 << 32)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise ConfigurationError(
            f"CodecOptions.{name} must be an int from {low} to {high}, not {value!r}"
        )


DEFAULT = CodecOptions()
