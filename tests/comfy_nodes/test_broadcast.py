"""Broadcast of any value from the leader, and of an image file only the leader has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from collectives import Communicator
from comfy_nodes import distribute
from comfy_nodes.collective import PeerNodeError
from comfy_nodes.images import load_image

from .helpers import DTYPES, images, run_node, spmd


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_keeps_batch_dimension_dtype_and_values(size: int, dtype: torch.dtype) -> None:
    full = images(1, dtype)  # a batch of one stays [1, H, W, C] (the original dropped the 1)

    def rank(comm: Communicator) -> torch.Tensor:
        return run_node("ClusterBroadcastTensor", full if comm.rank == 0 else None)[0]

    for got in spmd(size, rank):
        assert got.shape == (1, 3, 5, 3) and got.dtype == dtype and torch.equal(got, full)


@pytest.mark.parametrize(
    "value",
    [
        {"samples": torch.randn(2, 4, 8, 8), "batch_index": [3, 4]},
        torch.rand(2, 7, 7),
        [1, "two", 3.0],
    ],
    ids=["latent", "mask", "object"],
)
def test_broadcast_of_any_value(value: Any) -> None:
    def rank(comm: Communicator) -> Any:
        return run_node("ClusterBroadcastTensor", value if comm.rank == 0 else None)[0]

    for got in spmd(3, rank):
        if isinstance(value, dict):
            assert torch.equal(got["samples"], value["samples"]) and got["batch_index"] == [3, 4]
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got, value)
        else:
            assert got == value


def test_listen_is_the_follower_side_of_the_same_broadcast() -> None:
    full = images(2)

    def rank(comm: Communicator) -> torch.Tensor:
        if comm.rank == 0:
            return run_node("ClusterListenTensorBroadcast", tensor=full)[0]
        return run_node("ClusterListenTensorBroadcast")[0]  # no input on followers

    assert all(torch.equal(got, full) for got in spmd(3, rank))


def test_broadcast_without_a_value_on_the_leader_fails_everywhere() -> None:
    def rank(comm: Communicator) -> str:
        try:
            run_node("ClusterListenTensorBroadcast")
        except (ValueError, PeerNodeError) as err:
            return f"{type(err).__name__}: {'connect' in str(err)}"
        return "no error"

    assert spmd(2, rank, op_timeout=5.0) == ["ValueError: True", "PeerNodeError: True"]


def test_lossy_broadcast_is_the_same_on_every_rank() -> None:
    full = images(2)

    def rank(comm: Communicator) -> torch.Tensor:
        return run_node(
            "ClusterBroadcastTensor", full if comm.rank == 0 else None, codec=distribute.PNG8
        )[0]

    leader, follower = spmd(2, rank)
    assert torch.equal(leader, follower) and not torch.equal(leader, full)
    assert torch.allclose(leader, (full * 255).round() / 255, atol=1e-6)


def _png(path: Path, mode: str, size: tuple[int, int] = (6, 4)) -> Path:
    rng = np.random.default_rng(5)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("codec", distribute.CODECS)
def test_broadcast_loaded_image_needs_the_file_on_the_leader_only(
    comfy_folders: Path, mode: str, codec: str
) -> None:
    path = _png(comfy_folders / "input" / f"in_{mode}.png", mode)
    expected_image, expected_mask = load_image(path)

    def rank(comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:
        name = path.name if comm.rank == 0 else "absent_on_followers.png"
        return run_node("ClusterBroadcastLoadedImage", name, codec=codec)

    for image, mask in spmd(3, rank):
        # 8-bit pixels survive even the png codec unchanged
        assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask)
    assert expected_image.shape == (1, 4, 6, 3) and expected_image.dtype == torch.float32
    if mode == "RGBA":
        alpha = np.asarray(Image.open(path).getchannel("A"), dtype=np.float32) / 255.0
        assert torch.equal(expected_mask, 1.0 - torch.from_numpy(alpha)[None])
    else:
        assert expected_mask.shape == (1, 64, 64) and not expected_mask.any()  # as LoadImage


def test_broadcast_loaded_image_missing_on_the_leader_fails_everywhere(
    comfy_folders: Path,
) -> None:
    def rank(comm: Communicator) -> str:
        try:
            run_node("ClusterBroadcastLoadedImage", "nope.png")
        except (FileNotFoundError, PeerNodeError) as err:
            return type(err).__name__
        return "no error"

    assert spmd(2, rank, op_timeout=5.0) == ["FileNotFoundError", "PeerNodeError"]


def test_load_image_matches_comfyui_for_animations(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 3), (10 * i, 20, 30)) for i in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image, mask = load_image(path)
    assert image.shape == (3, 3, 4, 3) and mask.shape == (3, 64, 64)
