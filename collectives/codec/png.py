"""Opt-in, lossy transport of image batches as 8-bit PNG.

ComfyUI IMAGE tensors are float ``[B, H, W, C]`` in [0, 1]; as PNG they shrink several-fold on
slow links.  Values are clamped to [0, 1] (NaN as 0) and rounded to multiples of 1/255, so the
error is at most 1/510 plus the rounding of the original dtype.  Only used when
``CodecOptions.image_codec == "png"``; without it images are sent bit-exactly like any tensor.
"""

from __future__ import annotations

import io
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from collectives.errors import CodecError

from . import dtypes

if TYPE_CHECKING:
    import torch

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Deflate expands at most ~1032x; an image announcing more pixels than its bytes could hold is
# forged, and must be refused before Pillow allocates it.
_MAX_DEFLATE_RATIO = 1100
# ComfyUI saves with level 4: most of the size gain of 9 at a fraction of the time.
_COMPRESS_LEVEL = 4


def _pillow() -> ModuleType:
    try:
        from PIL import Image
    except ImportError:
        raise CodecError(
            "codec: image_codec='png' needs Pillow (pip install 'comfyui-cluster[images]')"
        ) from None
    return Image


def _is_float(dtype_name: str) -> bool:
    return dtype_name.startswith(("float", "bfloat"))


def eligible(t: torch.Tensor) -> bool:
    return bool(t.is_floating_point() and t.dim() == 4 and t.shape[-1] in _MODES and t.numel())


def encode_images(t: torch.Tensor) -> tuple[bytes, tuple[int, ...]]:
    """All images of the batch as concatenated PNG files, and the byte length of each."""
    import torch

    image = _pillow()
    pixels = (
        t.detach()
        .to("cpu", torch.float32)
        .nan_to_num(0.0)
        .clamp(0.0, 1.0)
        .mul(255.0)
        .round()
        .to(torch.uint8)
        .numpy()
    )
    files = []
    for picture in pixels:
        out = io.BytesIO()
        image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(
            out, format="PNG", compress_level=_COMPRESS_LEVEL
        )
        files.append(out.getvalue())
    return b"".join(files), tuple(len(f) for f in files)


def check_meta(
    framework: str, dtype_name: str, shape: tuple[int, ...], parts: tuple[int, ...]
) -> None:
    batch, height, width, channels = shape
    if framework != "torch" or not _is_float(dtype_name) or channels not in _MODES:
        raise CodecError("codec: png encoding is only valid for float torch [B, H, W, C] tensors")
    if min(batch, height, width) < 1 or len(parts) != batch or min(parts) < 1:
        raise CodecError("codec: malformed png image table")


def decode_images(
    shape: tuple[int, ...], parts: tuple[int, ...], raw: memoryview, entry: dtypes.DType
) -> torch.Tensor:
    import torch

    _, height, width, channels = shape
    if sum(parts) != raw.nbytes:
        raise CodecError(f"codec: png table sums to {sum(parts)} bytes, buffer has {raw.nbytes}")
    if any(height * (width * channels + 1) > n * _MAX_DEFLATE_RATIO for n in parts):
        raise CodecError(f"codec: png image of {shape[1:]} cannot come from so few bytes")
    image = _pillow()
    pixels = np.empty(shape, dtype=np.uint8)
    offset = 0
    for index, size in enumerate(parts):
        data = io.BytesIO(raw[offset : offset + size])
        offset += size
        try:
            with image.open(data, formats=["PNG"]) as picture:
                if picture.size != (width, height) or picture.mode != _MODES[channels]:
                    raise CodecError(
                        f"codec: png image {index} is {picture.mode} {picture.size}, "
                        f"expected {_MODES[channels]} {(width, height)}"
                    )
                pixels[index] = np.asarray(picture).reshape(height, width, channels)
        except CodecError:
            raise
        except Exception as e:
            raise CodecError(f"codec: corrupt png image {index}: {e}") from e
    dtype = dtypes.torch_dtype(entry)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.from_numpy(pixels).to(work) / 255.0).to(dtype)
