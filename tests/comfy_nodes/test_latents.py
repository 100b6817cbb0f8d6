"""LATENT fan-out, fan-in and gather: every key kept, batch_index giving single-instance noise."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from collectives import Communicator
from comfy_nodes.partition import split_ranges
from comfy_nodes.tensors import SYNTHETIC_BATCH_INDEX, merge_latents, slice_latent

from .helpers import DTYPES, run_node, spmd

SIZES = [1, 2, 3, 4]


def comfy_prepare_noise(
    latent: torch.Tensor, seed: int, noise_inds: list[int] | None = None
) -> torch.Tensor:
    """What ComfyUI's KSampler does (comfy.sample.prepare_noise): without batch_index one draw
    for the whole batch, with it one draw per index up to the largest, keeping those listed."""
    generator = torch.Generator().manual_seed(seed)
    if noise_inds is None:
        return torch.randn(latent.size(), dtype=latent.dtype, generator=generator)
    unique, inverse = np.unique(noise_inds, return_inverse=True)
    noises = []
    for i in range(int(unique[-1]) + 1):
        noise = torch.randn([1, *latent.shape[1:]], dtype=latent.dtype, generator=generator)
        if i in unique:
            noises.append(noise)
    return torch.cat([noises[i] for i in inverse], dim=0)


def latent(
    batch: int, dtype: torch.dtype = torch.float32, item: tuple[int, ...] = (4, 8, 8), **extra: Any
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(99 + batch)
    return {"samples": torch.randn((batch, *item), generator=g).to(dtype), **extra}


def fan_out_in(size: int, full: dict[str, Any]) -> list[tuple[dict[str, Any], ...]]:
    def rank(comm: Communicator) -> tuple[dict[str, Any], ...]:
        mine = run_node("ClusterFanOutLatent", full if comm.rank == 0 else None)[0]
        back = run_node("ClusterFanInLatent", mine)[0]
        every = run_node("ClusterGatherLatents", mine)[0]
        return mine, back, every

    return spmd(size, rank)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_every_key_and_value(size: int, dtype: torch.dtype) -> None:
    full = latent(5, dtype, downscale_ratio_spacial=8, type="sd15")
    full["noise_mask"] = torch.rand(5, 1, 8, 8).to(dtype)
    for r, (mine, back, every) in enumerate(fan_out_in(size, full)):
        a, b = split_ranges(5, size)[r]
        assert torch.equal(mine["samples"], full["samples"][a:b])
        assert mine["samples"].dtype == dtype
        assert torch.equal(mine["noise_mask"], full["noise_mask"][a:b])
        assert mine["downscale_ratio_spacial"] == 8 and mine["type"] == "sd15"
        if size > 1:
            assert mine["batch_index"] == list(range(a, b))
        for whole in [every] + ([back] if r == 0 else []):
            assert set(whole) == set(full)  # batch_index made up by fan-out is gone again
            assert torch.equal(whole["samples"], full["samples"])
            assert whole["samples"].dtype == dtype
            assert torch.equal(whole["noise_mask"], full["noise_mask"])
            assert whole["type"] == "sd15"
        if r > 0:
            assert torch.equal(back["samples"], mine["samples"])  # followers keep their slice


@pytest.mark.parametrize("size", SIZES)
def test_gather_returns_one_latent_not_a_list(size: int) -> None:
    full = latent(4)
    for _, _, every in fan_out_in(size, full):
        assert isinstance(every, dict) and torch.equal(every["samples"], full["samples"])


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("batch", [4, 5, 7])
def test_each_rank_draws_the_single_instance_noise(size: int, batch: int) -> None:
    full = latent(batch)  # SD latent items of 4x8x8: 256 elements, a multiple of 16
    single = comfy_prepare_noise(full["samples"], seed=42)
    results = fan_out_in(size, full)
    noises = [
        comfy_prepare_noise(mine["samples"], 42, mine["batch_index"])
        for mine, _, _ in results
        if mine["samples"].shape[0]
    ]
    assert torch.equal(torch.cat(noises), single)


def test_noise_matches_batch_index_semantics_for_any_item_size() -> None:
    # Items of 4x7x9 (252 elements): torch draws a whole batch differently from item by item, so
    # the reference is the single-instance run of a latent that has a batch_index.
    full = latent(5, item=(4, 7, 9))
    results = fan_out_in(3, full)
    noises = [comfy_prepare_noise(m["samples"], 7, m["batch_index"]) for m, _, _ in results]
    assert torch.equal(torch.cat(noises), comfy_prepare_noise(full["samples"], 7, list(range(5))))


def test_existing_batch_index_is_sliced_and_restored() -> None:
    full = latent(5, batch_index=[10, 11, 12, 13, 14])
    results = fan_out_in(2, full)
    assert [m["batch_index"] for m, _, _ in results] == [[10, 11, 12], [13, 14]]
    assert all(SYNTHETIC_BATCH_INDEX not in m for m, _, _ in results)
    assert results[0][1]["batch_index"] == [10, 11, 12, 13, 14]
    single = comfy_prepare_noise(full["samples"], 3, full["batch_index"])
    per_rank = [comfy_prepare_noise(m["samples"], 3, m["batch_index"]) for m, _, _ in results]
    assert torch.equal(torch.cat(per_rank), single)


def test_batch_index_changed_downstream_is_kept() -> None:
    full = latent(4)

    def rank(comm: Communicator) -> dict[str, Any]:
        mine = run_node("ClusterFanOutLatent", full if comm.rank == 0 else None)[0]
        mine = {**mine, "batch_index": [i + 100 for i in mine["batch_index"]]}
        return run_node("ClusterGatherLatents", mine)[0]

    for every in spmd(2, rank):
        assert every["batch_index"] == [100, 101, 102, 103]
        assert SYNTHETIC_BATCH_INDEX not in every


@pytest.mark.parametrize("mask_batch", [1, 2, 7])
def test_noise_mask_follows_comfyui_repeat_semantics(mask_batch: int) -> None:
    full = latent(5)
    full["noise_mask"] = torch.rand(mask_batch, 1, 8, 8)
    # ComfyUI repeats (or truncates) the mask to the batch: item i uses mask[i % M].
    used = torch.stack([full["noise_mask"][i % mask_batch] for i in range(5)])
    results = fan_out_in(2, full)
    for r, (mine, _, every) in enumerate(results):
        a, b = split_ranges(5, 2)[r]
        if mask_batch == 1:
            assert torch.equal(mine["noise_mask"], full["noise_mask"])
            assert torch.equal(every["noise_mask"], full["noise_mask"])
        else:
            assert torch.equal(mine["noise_mask"], used[a:b])
            assert torch.equal(every["noise_mask"], used)


def test_fanned_out_latent_of_fewer_items_than_ranks() -> None:
    full = latent(2, torch.bfloat16)
    results = fan_out_in(4, full)
    assert [m["samples"].shape[0] for m, _, _ in results] == [1, 1, 0, 0]
    # an empty batch_index would make ComfyUI's prepare_noise fail: empty slices carry none
    assert [m.get("batch_index") for m, _, _ in results] == [[0], [1], None, None]
    assert all(
        m["samples"].shape[1:] == (4, 8, 8) and m["samples"].dtype == torch.bfloat16
        for m, _, _ in results
    )
    assert all(torch.equal(e["samples"], full["samples"]) for _, _, e in results)
    assert all("batch_index" not in e for _, _, e in results)
    indexed = fan_out_in(4, latent(2, batch_index=[10, 11]))
    assert [m.get("batch_index") for m, _, _ in indexed] == [[10], [11], None, None]
    assert all(e["batch_index"] == [10, 11] for _, _, e in indexed)


def test_weighted_latent_fan_out() -> None:
    full = latent(8)

    def rank(comm: Communicator) -> list[int]:
        mine = run_node("ClusterFanOutLatent", full if comm.rank == 0 else None, weights="1,3")
        return list(mine[0]["batch_index"])

    assert spmd(2, rank) == [[0, 1], [2, 3, 4, 5, 6, 7]]


def test_merge_fills_missing_masks_and_indices() -> None:
    a = slice_latent(latent(4, noise_mask=torch.zeros(4, 1, 8, 8)), 0, 2)
    b = {"samples": torch.ones(2, 4, 8, 8)}  # a node on rank 1 built a fresh LATENT
    merged = merge_latents([a, b], 0)
    assert merged["samples"].shape[0] == 4
    assert torch.equal(merged["noise_mask"][2:], torch.ones(2, 1, 8, 8))
    assert "batch_index" not in merged  # only made-up indices: dropped again
    a["batch_index"] = [5, 6]  # a real one: kept, the missing part gets its positions
    assert merge_latents([a, b], 0)["batch_index"] == [5, 6, 2, 3]


def test_not_a_latent_is_refused() -> None:
    with pytest.raises(TypeError, match="LATENT"):
        spmd(1, lambda comm: run_node("ClusterFanOutLatent", torch.zeros(1, 4, 8, 8)))


def test_the_pack_never_unpickles_even_where_the_environment_allows_it() -> None:
    from collectives import CodecOptions
    from comfy_nodes import distribute

    full = latent(3, torch.float16, noise_mask=torch.rand(3, 1, 8, 8), type="sd15")
    pictures = torch.rand(3, 4, 4, 3)

    def rank(comm: Communicator) -> tuple[dict[str, Any], torch.Tensor]:
        mine = run_node("ClusterFanOutLatent", full if comm.rank == 0 else None)[0]
        img = run_node(
            "ClusterFanOutImage", pictures if comm.rank == 0 else None, codec=distribute.PNG8
        )[0]
        return run_node("ClusterGatherLatents", mine)[0], run_node("ClusterGatherImages", img)[0]

    # Allowed here (as COMFY_CLUSTER_ALLOW_PICKLE=1 would): the pack turns it off for itself.
    def checked(comm: Communicator) -> tuple[dict[str, Any], torch.Tensor]:
        assert not comm.options.codec.allow_pickle
        return rank(comm)

    for every, img in spmd(3, checked, codec=CodecOptions(allow_pickle=True)):
        assert torch.equal(every["samples"], full["samples"]) and every["type"] == "sd15"
        assert torch.equal(every["noise_mask"], full["noise_mask"])
        assert img.shape == pictures.shape
