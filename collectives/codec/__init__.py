"""Tensor and object framing: a small header plus raw, out-of-band buffers.

* :func:`encode` / :func:`decode`: header + list of buffers, for scatter/gather transports.
  Tensors, ndarrays and bytes travel as raw bytes, without copies where memory allows.
* :func:`dumps` / :func:`loads`: the same as one contiguous frame.
* :class:`CodecOptions`: safe mode (no pickle), zstd/lz4 compression, opt-in lossy PNG for images,
  device placement of decoded tensors.

The wire format is described in :mod:`collectives.codec.frames`.  Lossless by default: dtype
(bf16, fp16, fp8 ... included), shape and every bit of the values are kept.
"""

from __future__ import annotations

from .api import decode, dumps, encode, loads
from .frames import (
    FIXED_PREFIX,
    MAX_HEADER_BYTES,
    Encoded,
    buffer_sizes,
    header_length,
    pack,
    unpack,
)
from .options import DEFAULT, CodecOptions
from .tensors import TensorMeta, alloc_buffer, tensor_bytes

__all__ = [
    "DEFAULT",
    "FIXED_PREFIX",
    "MAX_HEADER_BYTES",
    "CodecOptions",
    "Encoded",
    "TensorMeta",
    "alloc_buffer",
    "buffer_sizes",
    "decode",
    "dumps",
    "encode",
    "header_length",
    "loads",
    "pack",
    "tensor_bytes",
    "unpack",
]
