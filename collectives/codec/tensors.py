"""Tensors and ndarrays <-> (TensorMeta, raw bytes), zero-copy both ways where memory allows.

``TensorMeta`` binary layout (little-endian)::

    0  1  framework (0 torch, 1 numpy)
    1  1  dtype code (see dtypes.TABLE)
    2  1  encoding (0 raw, 1 png)
    3  1  ndim (<= 64)
    4  1  length of the device string
    5  .. device, ASCII ("cpu", "cuda:1"); numpy arrays always "cpu"
    .. 8*ndim shape
    .. 8*B  png only: byte length of each of the B = shape[0] images

requires_grad, tensor subclasses (nn.Parameter ...) and the sharing of storage between tensors
are not transmitted: a tensor decodes as a plain, contiguous ``torch.Tensor``.
"""

from __future__ import annotations

import re
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from collectives.errors import CodecError

from . import dtypes, png
from .options import CodecOptions

if TYPE_CHECKING:
    import torch

Framework = Literal["torch", "numpy"]
Encoding = Literal["raw", "png"]

_FRAMEWORKS: tuple[Framework, ...] = ("torch", "numpy")
_ENCODINGS: tuple[Encoding, ...] = ("raw", "png")
_FIXED = struct.Struct("<BBBBB")
_MAX_NDIM = 64
_DEVICE_RE = re.compile(r"[a-z][a-z0-9_]{0,15}(:[0-9]{1,4})?")


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to rebuild a tensor or ndarray from its raw buffer."""

    framework: Framework
    dtype: str  # a name from the dtype table, e.g. "bfloat16"
    shape: tuple[int, ...]
    device: str = "cpu"
    encoding: Encoding = "raw"
    part_lengths: tuple[int, ...] = ()  # png: bytes of each image in the buffer

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded (raw) data."""
        return self.numel * dtypes.BY_NAME[self.dtype].itemsize

    def to_bytes(self) -> bytes:
        device = self.device.encode("ascii")
        return b"".join(
            [
                _FIXED.pack(
                    _FRAMEWORKS.index(self.framework),
                    dtypes.BY_NAME[self.dtype].code,
                    _ENCODINGS.index(self.encoding),
                    len(self.shape),
                    len(device),
                ),
                device,
                struct.pack(f"<{len(self.shape)}Q", *self.shape),
                struct.pack(f"<{len(self.part_lengths)}Q", *self.part_lengths),
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> TensorMeta:
        if len(data) < _FIXED.size:
            raise CodecError("codec: truncated tensor metadata")
        fw, code, enc, ndim, dev_len = _FIXED.unpack_from(data)
        if fw >= len(_FRAMEWORKS) or enc >= len(_ENCODINGS) or ndim > _MAX_NDIM:
            raise CodecError("codec: malformed tensor metadata")
        framework, encoding = _FRAMEWORKS[fw], _ENCODINGS[enc]
        entry = dtypes.by_code(code)
        pos = _FIXED.size + dev_len
        device = data[_FIXED.size : pos].decode("ascii", "replace")
        if not _DEVICE_RE.fullmatch(device) or (framework == "numpy" and device != "cpu"):
            raise CodecError(f"codec: invalid device {device!r} in tensor metadata")
        nparts = 0
        if encoding == "png":
            if ndim != 4 or len(data) < pos + 8:
                raise CodecError("codec: png tensor metadata needs a 4-d shape")
            (nparts,) = struct.unpack_from("<Q", data, pos)
        if len(data) != pos + 8 * (ndim + nparts):
            raise CodecError("codec: tensor metadata has the wrong length for its shape")
        shape = struct.unpack_from(f"<{ndim}Q", data, pos)
        parts = struct.unpack_from(f"<{nparts}Q", data, pos + 8 * ndim)
        if any(d >= 1 << 62 for d in shape):
            raise CodecError(f"codec: absurd tensor shape {shape}")
        meta = cls(framework, entry.name, shape, device, encoding, parts)
        if encoding == "png":
            png.check_meta(framework, entry.name, shape, parts)
        return meta


def alloc_buffer(nbytes: int) -> memoryview:
    """A writable, uninitialised byte buffer to receive into; ``decode`` wraps it zero-copy."""
    if nbytes < 0:
        raise ValueError(f"alloc_buffer: nbytes must be >= 0, got {nbytes}")
    return np.empty(nbytes, dtype=np.uint8).data


def is_tensor(obj: object) -> bool:
    # torch is never imported here: if the caller has not imported it, obj cannot be a tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_wire_array(obj: object) -> bool:
    """A plain numpy array whose dtype is in the table (goes out of band as raw bytes)."""
    return type(obj) is np.ndarray and dtypes.numpy_dtype_for(obj.dtype) is not None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (C order): a zero-copy view for contiguous CPU tensors."""
    import torch

    t = t.detach()
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise CodecError(f"codec: cannot send a {t.layout} tensor; convert it with .to_dense()")
    if t.device.type != "cpu":
        t = t.cpu()
    # Lazy conjugate/negative views cannot be reinterpreted as bytes; materialise them.
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def _array_bytes(a: npt.NDArray[np.generic]) -> memoryview:
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8).data


def to_wire(obj: object, options: CodecOptions) -> tuple[TensorMeta, memoryview, bool]:
    """``(meta, data, compressible)`` for a tensor or table-dtype ndarray."""
    if isinstance(obj, np.ndarray):
        entry = dtypes.numpy_dtype_for(obj.dtype)
        if entry is None:
            raise CodecError(f"codec: numpy dtype {obj.dtype} has no wire code")
        return TensorMeta("numpy", entry.name, tuple(obj.shape)), _array_bytes(obj), True
    t: torch.Tensor = obj  # type: ignore[assignment]
    found = dtypes.torch_dtype_for(t.dtype)
    if found is None:
        raise CodecError(f"codec: torch dtype {t.dtype} has no wire code")
    shape = tuple(t.shape)
    device = str(t.device)
    if options.image_codec == "png" and png.eligible(t):
        files, parts = png.encode_images(t)
        meta = TensorMeta("torch", found.name, shape, device, "png", parts)
        return meta, memoryview(files), False
    try:
        data = tensor_bytes(t)
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"codec: cannot read tensor data ({t.device}, {t.dtype}): {e}") from e
    return TensorMeta("torch", found.name, shape, device), data, True


def writable_bytes(raw: memoryview, align: int = 16) -> npt.NDArray[np.uint8]:
    """``raw`` as a uint8 array we may hand out: wrapped when writable and aligned, else copied."""
    arr = np.frombuffer(raw, dtype=np.uint8)
    if not arr.flags.writeable or arr.ctypes.data % align:
        arr = np.array(arr, dtype=np.uint8, copy=True)
    return arr


def from_wire(meta: TensorMeta, raw: memoryview, options: CodecOptions) -> object:
    entry = dtypes.BY_NAME[meta.dtype]
    if meta.encoding == "png":
        images = png.decode_images(meta.shape, meta.part_lengths, raw, entry)
        return _to_device(images, meta, options)
    if raw.nbytes != meta.nbytes:
        raise CodecError(
            f"codec: {meta.dtype}{list(meta.shape)} needs {meta.nbytes} bytes, "
            f"buffer has {raw.nbytes}"
        )
    arr = writable_bytes(raw, entry.itemsize)
    if entry.name == "bool" and arr.size and arr.max() > 1:
        raise CodecError("codec: bool data holds bytes other than 0 and 1")
    if meta.framework == "numpy":
        return arr.view(dtypes.numpy_dtype(entry)).reshape(meta.shape)
    dtype = dtypes.torch_dtype(entry)
    import torch

    # torch cannot reinterpret a zero-length numpy-backed tensor, so start empty ones afresh.
    base = torch.from_numpy(arr) if arr.size else torch.zeros(0, dtype=torch.uint8)
    return _to_device(base.view(dtype).reshape(meta.shape), meta, options)


def _to_device(t: torch.Tensor, meta: TensorMeta, options: CodecOptions) -> torch.Tensor:
    target = options.map_location or _recorded_device_if_present(meta.device)
    if target == "cpu":
        return t
    try:
        return t.to(target)
    except Exception as e:
        raise CodecError(f"codec: cannot place tensor on {target!r}: {e}") from e


def _recorded_device_if_present(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    index = int(device.partition(":")[2] or 0)
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        return device
    return "cpu"
