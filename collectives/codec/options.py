"""Encoding options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from collectives.errors import ConfigurationError


@dataclass(frozen=True)
class CodecOptions:
    """How to encode (and, for ``safe`` and ``map_location``, decode) a message.

    ``safe``: never unpickle.  Only tensors, numeric ndarrays (and numeric numpy scalars),
    bytes/bytearray/memoryview, str, int, float, complex, bool, None and list/tuple/dict of them
    are accepted, by exact type (subclasses, sets and custom classes are refused with a
    :class:`~collectives.errors.CodecError` naming the type).  Dict keys may be str, int, float,
    bool, None, bytes or tuples of those.  Decoding a pickle message with ``safe=True`` is refused.

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

    safe: bool = False
    compression: Literal["zstd", "lz4"] | None = None
    compression_level: int | None = None
    min_compress_bytes: int = 4096
    image_codec: Literal["png"] | None = None
    map_location: str | None = None

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


DEFAULT = CodecOptions()
