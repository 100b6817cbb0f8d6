"""A txt2img-shaped workflow spread over the ranks gives the single-instance pictures exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collectives import Communicator

from .helpers import run_node, spmd
from .test_latents import comfy_prepare_noise

SEED = 1234


def ksampler(latent: dict[str, Any]) -> dict[str, Any]:
    """Stand-in for KSampler: ComfyUI's noise for this latent, then a fixed 'denoise'."""
    noise = comfy_prepare_noise(latent["samples"], SEED, latent.get("batch_index"))
    return {**latent, "samples": torch.tanh(latent["samples"] + noise)}


def vae_decode(latent: dict[str, Any]) -> torch.Tensor:
    """Stand-in for VAEDecode: LATENT [B, 4, h, w] -> IMAGE [B, h, w, 3] in 0..1."""
    x = latent["samples"][:, :3].permute(0, 2, 3, 1)
    return (x + 1) / 2


def single_instance(batch: int) -> torch.Tensor:
    empty = {"samples": torch.zeros(batch, 4, 8, 8)}
    return vae_decode(ksampler(empty))


@pytest.mark.parametrize(
    ("size", "weights"), [(1, ""), (2, ""), (3, ""), (4, ""), (4, "2,1,1,1"), (3, "0,1,2")]
)
def test_fan_out_sample_decode_fan_in_equals_one_instance(size: int, weights: str) -> None:
    batch = 7

    def rank(comm: Communicator) -> torch.Tensor:
        # Every rank runs EmptyLatentImage (same graph everywhere); only the leader's is used.
        empty = {"samples": torch.zeros(batch, 4, 8, 8)}
        mine = run_node("ClusterFanOutLatent", empty, weights=weights)[0]
        images = vae_decode(ksampler(mine))
        return run_node("ClusterFanInImages", images)[0]

    leader = spmd(size, rank)[0]
    assert torch.equal(leader, single_instance(batch))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_progressive_rounds_of_fan_out_and_fan_in(size: int) -> None:
    start = torch.rand(5, 3, 3, 3, generator=torch.Generator().manual_seed(8))

    def refine(x: torch.Tensor) -> torch.Tensor:
        return (x * 0.7 + 0.1).clamp(0, 1)

    def rank(comm: Communicator) -> torch.Tensor:
        current = start  # the same graph on every rank: FanIn's output feeds the next FanOut
        for _ in range(3):
            mine = run_node("ClusterFanOutImage", current)[0]
            current = run_node("ClusterFanInImages", refine(mine))[0]
        return current

    expected = refine(refine(refine(start)))
    assert torch.equal(spmd(size, rank)[0], expected)
