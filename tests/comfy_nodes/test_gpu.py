"""CUDA tensors through the nodes (deselected without a GPU; run with ``pytest -m gpu``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collectives import Communicator

from .helpers import run_node, spmd

pytestmark = pytest.mark.gpu


def test_cuda_batches_and_latents_round_trip_exactly() -> None:
    full = torch.rand(5, 8, 8, 3, device="cuda", dtype=torch.float16)
    latent = {"samples": torch.randn(5, 4, 8, 8, device="cuda", dtype=torch.bfloat16)}

    def rank(comm: Communicator) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        mine = run_node("ClusterFanOutImage", full)[0]
        lat = run_node("ClusterFanOutLatent", latent)[0]
        assert mine.device.type == "cuda" and lat["samples"].device.type == "cuda"
        return (
            run_node("ClusterFanInImages", mine)[0],
            run_node("ClusterGatherImages", mine.cpu())[0],  # lands on the own slice's device
            run_node("ClusterGatherLatents", lat)[0],
        )

    results = spmd(3, rank)
    assert torch.equal(results[0][0], full)
    for _, every, lat in results:
        assert every.device.type == "cpu" and torch.equal(every, full.cpu())
        assert torch.equal(lat["samples"], latent["samples"])
