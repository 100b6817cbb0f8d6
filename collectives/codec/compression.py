"""Optional per-buffer zstd/lz4 compression.

Decompression writes into freshly allocated writable memory of exactly the declared ``raw_len``,
so decoded tensors can wrap it without a further copy.  By the time we get here
:func:`~collectives.codec.frames.check_header` has held every ``raw_len`` to the codec's expansion
ratio and the receiver's ``max_message_bytes``; zstd streams into that buffer and stops at its end,
so a frame expanding further is refused without producing more, and short data is refused too.
"""

from __future__ import annotations

from collectives.errors import CodecError

from .frames import CODEC_LZ4, CODEC_NAMES, CODEC_ZSTD
from .options import CodecOptions
from .tensors import alloc_buffer


def compress(view: memoryview, options: CodecOptions) -> tuple[int, memoryview] | None:
    """``(codec, compressed)`` when compressing is enabled and pays off, else None."""
    if options.compression is None or view.nbytes < max(options.min_compress_bytes, 1):
        return None
    codec = CODEC_NAMES[options.compression]
    level = options.compression_level
    try:
        if codec == CODEC_ZSTD:
            import zstandard

            cctx = zstandard.ZstdCompressor(level=3 if level is None else level)
            out: bytes = cctx.compress(view)
        else:
            import lz4.block

            if level is None or level == 0:
                out = lz4.block.compress(view, store_size=False)
            elif level > 0:
                out = lz4.block.compress(
                    view, mode="high_compression", compression=level, store_size=False
                )
            else:
                out = lz4.block.compress(view, mode="fast", acceleration=-level, store_size=False)
    except ImportError as e:
        raise CodecError(
            f"codec: compression={options.compression!r} needs the {e.name} package "
            "(pip install 'comfyui-cluster[compression]')"
        ) from e
    if len(out) >= view.nbytes:
        return None
    return codec, memoryview(out)


def decompress(codec: int, data: memoryview, raw_len: int) -> memoryview:
    """Decompress ``data`` into a new writable buffer of exactly ``raw_len`` bytes."""
    try:
        if codec == CODEC_ZSTD:
            out = _zstd_decompress(data, raw_len)
        elif codec == CODEC_LZ4:
            import lz4.block

            out = memoryview(
                lz4.block.decompress(data, uncompressed_size=raw_len, return_bytearray=True)
            )
        else:
            raise CodecError(f"codec: unknown compression codec {codec}")
    except CodecError:
        raise
    except ImportError as e:
        raise CodecError(f"codec: message is compressed but {e.name} is not installed") from e
    except Exception as e:
        raise CodecError(f"codec: corrupt compressed buffer: {e}") from e
    if out.nbytes != raw_len:
        raise CodecError(
            f"codec: compressed buffer expands to {out.nbytes} bytes, header says {raw_len}"
        )
    return out


def _zstd_decompress(data: memoryview, raw_len: int) -> memoryview:
    import zstandard

    out = alloc_buffer(raw_len)
    filled = 0
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    with reader:
        while filled < raw_len:
            got = reader.readinto(out[filled:])
            if not got:
                raise CodecError(
                    f"codec: compressed buffer expands to {filled} bytes, header says {raw_len}"
                )
            filled += got
        if reader.read(1):
            raise CodecError(f"codec: compressed buffer expands past the {raw_len} bytes declared")
    return out
