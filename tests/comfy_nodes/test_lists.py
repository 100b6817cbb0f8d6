"""List and batch utility nodes (local, no communication)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collectives import Communicator
from comfy_nodes.lists import strided_order

from .helpers import images, run_node, spmd


def share(size: int, batch: list[Any], offset: int = 0, weights: str | None = None) -> list[Any]:
    def rank(comm: Communicator) -> Any:
        kwargs = {} if weights is None else {"weights": [weights]}
        return run_node("ClusterGetInstanceWorkItemFromBatch", batch, [offset], **kwargs)[0]

    return spmd(size, rank)


def test_work_item_with_one_item_per_rank() -> None:
    assert share(4, ["a", "b", "c", "d"]) == [["a"], ["b"], ["c"], ["d"]]
    assert share(4, ["a", "b", "c", "d"], offset=1) == [["b"], ["c"], ["d"], ["a"]]


def test_work_items_are_contiguous_shares_of_a_long_list() -> None:
    cfgs = [3.0 + 0.5 * i for i in range(10)]
    assert share(4, cfgs) == [cfgs[0:3], cfgs[3:6], cfgs[6:8], cfgs[8:10]]
    assert share(2, cfgs, weights="4,1") == [cfgs[:8], cfgs[8:]]
    assert share(1, cfgs) == [cfgs]


def test_work_item_of_a_batch_every_rank_has() -> None:
    full = images(5)
    parts = share(2, [full])
    assert [len(p) for p in parts] == [1, 1]
    assert torch.equal(parts[0][0], full[:3]) and torch.equal(parts[1][0], full[3:])
    latent = {"samples": torch.zeros(5, 4, 2, 2)}
    mine = share(3, [latent])
    assert [m[0]["batch_index"] for m in mine] == [[0, 1], [2, 3], [4]]


def test_work_item_cache_key_is_the_rank() -> None:
    from comfy_nodes import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS["ClusterGetInstanceWorkItemFromBatch"]
    assert spmd(2, lambda comm: cls.IS_CHANGED(batch=[1])) == ["0/2", "1/2"]


def test_split_and_flatten() -> None:
    full = images(3)
    items = run_node("ClusterSplitBatchToList", full)[0]
    assert [i.shape[0] for i in items] == [1, 1, 1]
    assert torch.equal(torch.cat(items), full)
    latents = run_node("ClusterSplitBatchToList", {"samples": torch.zeros(2, 4, 2, 2), "x": 1})[0]
    assert [(item["batch_index"], item["x"]) for item in latents] == [([0], 1), ([1], 1)]
    flat = run_node("ClusterFlattenBatchedImageList", [images(2), [images(1), images(3)]])[0]
    assert len(flat) == 6 and all(i.shape == (1, 3, 5, 3) for i in flat)
    assert torch.equal(flat[0], images(2)[:1]) and torch.equal(flat[5], images(3)[2:])


@pytest.mark.parametrize(
    ("index", "expected"), [(0, "xabc"), (1, "axbc"), (3, "abcx"), (9, "abcx"), (-1, "abxc")]
)
def test_insert_at_index_in_a_list(index: int, expected: str) -> None:
    assert "".join(run_node("ClusterInsertAtIndex", list("abc"), ["x"], [index])[0]) == expected


def test_insert_at_index_in_a_batch() -> None:
    full, extra = images(3), images(1) + 5
    (out,) = run_node("ClusterInsertAtIndex", [full], [extra], [1])[0]
    assert torch.equal(out, torch.cat([full[:1], extra, full[1:]]))


def test_strided_reorder_turns_rank_major_into_item_major() -> None:
    rank_major = ["r0i0", "r0i1", "r0i2", "r1i0", "r1i1", "r1i2"]
    out = run_node("ClusterStridedReorder", rank_major, [3])[0]
    assert out == ["r0i0", "r1i0", "r0i1", "r1i1", "r0i2", "r1i2"]
    assert run_node("ClusterStridedReorder", out, [2])[0] == rank_major  # the inverse
    assert strided_order(5, 2) == [0, 2, 4, 1, 3]
    with pytest.raises(ValueError, match="stride"):
        strided_order(3, 0)


def test_strided_reorder_of_a_batch_keeps_each_latent_item_with_its_noise() -> None:
    latent = {
        "samples": torch.arange(4.0).reshape(4, 1, 1, 1),
        "noise_mask": torch.rand(4, 1, 1, 1),
    }
    (out,) = run_node("ClusterStridedReorder", [latent], [2])[0]
    assert out["samples"].flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    assert out["batch_index"] == [0, 2, 1, 3]
    assert torch.equal(out["noise_mask"], latent["noise_mask"][[0, 2, 1, 3]])
    (img,) = run_node("ClusterStridedReorder", [images(4)], [2])[0]
    assert torch.equal(img, images(4)[[0, 2, 1, 3]])
