"""Tensor and object framing: a small header plus raw, out-of-band buffers.

* :func:`encode` / :func:`decode`: header + list of buffers, for scatter/gather transports.
  Tensors, ndarrays and bytes travel as raw bytes, without copies where memory allows.
* :func:`dumps` / :func:`loads`: the same as one contiguous frame.
* :func:`check_header` / :func:`message_sizes` (and :func:`check_header_length` for an announced
  header length): what a receiver checks before it allocates;
  :func:`decode_array` for receive paths that only ever expect one tensor.
* :class:`CodecOptions`: pickle opt-in (off: nothing is ever unpickled), decoding limits
  (depth, message bytes, buffer count), zstd/lz4 compression, opt-in lossy PNG for images,
  device placement of decoded tensors.

The wire format is described in :mod:`collectives.codec.frames`.  Lossless by default: dtype
(bf16, fp16, fp8 ... included), shape and every bit of the values are kept.
"""

from __future__ import annotations

from .api import decode, decode_array, dumps, encode, loads
from .frames import (
    FIXED_PREFIX,
    MAX_HEADER_BYTES,
    Encoded,
    Header,
    Kind,
    check_header,
    check_header_length,
    header_length,
    header_limit,
    message_sizes,
    pack,
    unpack,
)
from .options import ALLOW_PICKLE_ENV, DEFAULT, MAX_DEPTH_LIMIT, CodecOptions
from .tensors import TensorMeta, alloc_buffer, tensor_bytes

__all__ = [
    "ALLOW_PICKLE_ENV",
    "DEFAULT",
    "FIXED_PREFIX",
    "MAX_DEPTH_LIMIT",
    "MAX_HEADER_BYTES",
    "CodecOptions",
    "Encoded",
    "Header",
    "Kind",
    "TensorMeta",
    "alloc_buffer",
    "check_header",
    "check_header_length",
    "header_limit",
    "decode",
    "decode_array",
    "dumps",
    "encode",
    "header_length",
    "loads",
    "message_sizes",
    "pack",
    "tensor_bytes",
    "unpack",
]
