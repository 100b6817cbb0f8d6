"""Opt-in lossy PNG for image batches; everything else, and images without opt-in, bit-exact."""

from __future__ import annotations

import pytest
import torch

from collectives.codec import CodecOptions, TensorMeta, decode, dumps, encode, loads
from collectives.codec.frames import Header
from collectives.errors import CodecError

from .helpers import same

PNG = CodecOptions(image_codec="png")


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_png_round_trip_within_one_step(channels: int, dtype: torch.dtype) -> None:
    images = torch.rand(2, 9, 7, channels, generator=torch.Generator().manual_seed(0)).to(dtype)
    back = loads(dumps(images, PNG))
    assert back.dtype == dtype and back.shape == images.shape
    tolerance = 1 / 255 + (1 / 128 if dtype == torch.bfloat16 else 1e-3)
    assert (back.double() - images.double()).abs().max().item() <= tolerance
    nested = loads(dumps({"IMAGE": images}, PNG))["IMAGE"]
    assert torch.equal(nested, back)


def test_png_is_smaller_for_images_and_clamps() -> None:
    images = torch.zeros(1, 64, 64, 3)
    images[0, :, :32] = 2.0
    images[0, 0, 0, 0] = float("nan")
    enc = encode(images, PNG)
    assert enc.nbytes < images.numel() * 4 / 10
    back = decode(enc.header, enc.buffers)
    assert back.max().item() == 1.0 and back[0, 0, 0, 0].item() == 0.0


def test_without_opt_in_images_are_bit_exact() -> None:
    images = torch.rand(2, 8, 8, 3) * 1.7 - 0.3
    assert same(loads(dumps(images)), images)
    assert same(loads(dumps({"i": images}))["i"], images)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.rand(8, 8, 3),  # 3-D
        torch.rand(1, 8, 8, 2),  # 2 channels
        torch.randint(0, 255, (1, 8, 8, 3), dtype=torch.uint8),  # not float
        torch.rand(0, 8, 8, 3),  # empty
    ],
    ids=["3d", "2ch", "uint8", "empty"],
)
def test_png_leaves_other_tensors_alone(tensor: torch.Tensor) -> None:
    assert same(loads(dumps(tensor, PNG)), tensor)


def test_corrupt_png_is_refused() -> None:
    frame = bytearray(dumps(torch.rand(1, 16, 16, 3), PNG))
    frame[-20] ^= 0xFF  # inside the IDAT/IEND chunks: the CRC no longer matches
    with pytest.raises(CodecError, match="png"):
        loads(frame)


def test_forged_png_dimensions_are_refused() -> None:
    enc = encode(torch.rand(1, 4, 4, 3), PNG)
    header = Header.parse(enc.header)
    meta = TensorMeta.from_bytes(header.body)
    for shape in [(1, 4, 5, 3), (1, 4, 4, 1), (1, 100_000, 100_000, 3)]:
        forged = TensorMeta("torch", meta.dtype, shape, "cpu", "png", meta.part_lengths)
        forged_header = Header(header.kind, header.entries, forged.to_bytes()).to_bytes()
        with pytest.raises(CodecError, match="png"):
            decode(forged_header, enc.buffers)
    with pytest.raises(CodecError, match="png"):
        TensorMeta.from_bytes(
            TensorMeta("torch", "int8", (1, 2, 2, 3), "cpu", "png", (5,)).to_bytes()
        )
