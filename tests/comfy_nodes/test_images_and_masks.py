"""IMAGE and MASK fan-out, fan-in and gather through the nodes, for world sizes 1-4."""

from __future__ import annotations

import pytest
import torch

from collectives import CollectiveMismatchError, Communicator
from comfy_nodes import distribute
from comfy_nodes.collective import PeerNodeError
from comfy_nodes.partition import split_ranges

from .helpers import DTYPES, images, run_node, spmd

SIZES = [1, 2, 3, 4]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fan_out_then_fan_in_is_exact(size: int, batch: int, dtype: torch.dtype) -> None:
    full = images(batch, dtype)

    def rank(comm: Communicator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mine = run_node("ClusterFanOutImage", full if comm.rank == 0 else None)[0]
        processed = mine * 2  # stands in for real per-rank work
        back = run_node("ClusterFanInImages", processed)[0]
        every = run_node("ClusterGatherImages", processed)[0]
        return mine, back, every

    results = spmd(size, rank)
    for r, (mine, _, every) in enumerate(results):
        a, b = split_ranges(batch, size)[r]
        assert mine.dtype == dtype and torch.equal(mine, full[a:b])
        assert mine.shape[1:] == full.shape[1:]  # empty slices keep the trailing shape
        assert torch.equal(every, full * 2) and every.dtype == dtype
    assert torch.equal(results[0][1], full * 2)  # the leader reassembles in rank order
    for mine, back, _ in results[1:]:
        assert torch.equal(back, mine * 2)  # followers keep their own slice


def test_followers_inputs_are_ignored_by_fan_out() -> None:
    full = images(4)

    def rank(comm: Communicator) -> torch.Tensor:
        junk = torch.full((9, 1, 1, 3), float(comm.rank))  # never looked at on followers
        return run_node("ClusterFanOutImage", full if comm.rank == 0 else junk)[0]

    assert [t.shape[0] for t in spmd(2, rank)] == [2, 2]


def test_more_ranks_than_items_leaves_empty_slices_that_still_take_part() -> None:
    full = images(2, torch.float16)

    def rank(comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:
        mine = run_node("ClusterFanOutImage", full if comm.rank == 0 else None)[0]
        return mine, run_node("ClusterGatherImages", mine)[0]

    results = spmd(4, rank)
    assert [m.shape for m, _ in results] == [(1, 3, 5, 3)] * 2 + [(0, 3, 5, 3)] * 2
    assert all(m.dtype == torch.float16 for m, _ in results)
    assert all(torch.equal(every, full) for _, every in results)


def test_weights_split_unevenly_by_largest_remainder() -> None:
    full = images(8)

    def rank(comm: Communicator) -> torch.Tensor:
        return run_node("ClusterFanOutImage", full if comm.rank == 0 else None, weights="3,1")[0]

    first, second = spmd(2, rank)
    assert torch.equal(first, full[:6]) and torch.equal(second, full[6:])


def test_weights_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFY_CLUSTER_WEIGHTS", "1,0,1")
    full = images(6)

    def rank(comm: Communicator) -> torch.Tensor:
        return run_node("ClusterFanOutImage", full if comm.rank == 0 else None)[0]

    assert [t.shape[0] for t in spmd(3, rank)] == [3, 0, 3]


def test_lossy_codec_only_when_chosen_and_applied_on_every_rank() -> None:
    full = images(4)

    def rank(comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:
        lossy = run_node(
            "ClusterFanOutImage", full if comm.rank == 0 else None, codec=distribute.PNG8
        )[0]
        return lossy, run_node("ClusterGatherImages", lossy, codec=distribute.PNG8)[0]

    results = spmd(2, rank)
    quantised = (full * 255).round() / 255
    for r, (lossy, every) in enumerate(results):
        assert lossy.dtype == torch.float32
        assert torch.allclose(lossy, quantised[2 * r : 2 * r + 2], atol=1e-6)
        assert torch.allclose(every, quantised, atol=1e-6)
    assert not torch.equal(results[0][0], full[:2])  # the leader's own slice went through it too


@pytest.mark.parametrize("size", SIZES)
def test_masks_batched_and_single(size: int) -> None:
    batch = torch.rand(5, 4, 6, generator=torch.Generator().manual_seed(3))
    single = torch.rand(4, 6, generator=torch.Generator().manual_seed(4))

    def rank(comm: Communicator) -> tuple[torch.Tensor, ...]:
        mine = run_node("ClusterFanOutMask", batch if comm.rank == 0 else None)[0]
        one = run_node("ClusterFanOutMask", single if comm.rank == 0 else None)[0]
        back = run_node("ClusterFanInMask", mine)[0]
        every = run_node("ClusterGatherMasks", mine)[0]
        every_one = run_node("ClusterGatherMasks", one)[0]
        return mine, one, back, every, every_one

    results = spmd(size, rank)
    for r, (mine, one, _, every, every_one) in enumerate(results):
        a, b = split_ranges(5, size)[r]
        assert torch.equal(mine, batch[a:b])
        assert torch.equal(every, batch)
        if size == 1:
            assert one is single and every_one is single  # identity
        else:
            assert one.shape == ((1, 4, 6) if r == 0 else (0, 4, 6))
            assert torch.equal(every_one, single.unsqueeze(0))
    assert torch.equal(results[0][2], batch)


def test_fan_in_refuses_items_of_different_sizes() -> None:
    def rank(comm: Communicator) -> torch.Tensor:
        return run_node("ClusterFanInImages", torch.zeros(1, 2 + comm.rank, 2, 3))[0]

    with pytest.raises(ValueError, match="same size"):
        spmd(2, rank)


def test_fan_in_of_mixed_dtypes_promotes_as_torch_cat() -> None:
    parts = [images(2, torch.float32), images(1, torch.float16), images(3, torch.bfloat16)]

    def rank(comm: Communicator) -> torch.Tensor:
        return run_node("ClusterFanInImages", parts[comm.rank])[0]

    got = spmd(3, rank)[0]
    want = torch.cat(parts)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_fan_in_of_a_follower_with_a_malformed_description_names_it() -> None:
    from comfy_nodes import fan_in

    real = fan_in._describe

    def lying(mine: torch.Tensor | None, failure: BaseException | None) -> tuple[object, ...]:
        desc = real(mine, failure)
        return ("batch", (-1, 2), "float32") if mine is not None and mine[0, 0, 0, 0] == 1 else desc

    def rank(comm: Communicator) -> str:
        try:
            run_node("ClusterFanInImages", torch.full((1, 2, 2, 3), float(comm.rank)))
        except (PeerNodeError, CollectiveMismatchError) as err:
            return type(err).__name__
        return "ok"

    fan_in._describe = lying  # type: ignore[assignment]
    try:
        got = spmd(2, rank, op_timeout=5.0)
    finally:
        fan_in._describe = real  # type: ignore[assignment]
    assert got[1] == "ok" and got[0] in ("PeerNodeError", "CollectiveMismatchError")


def test_missing_leader_input_fails_every_rank_at_once() -> None:
    def rank(comm: Communicator) -> str:
        try:
            run_node("ClusterFanOutImage", "not an image" if comm.rank == 0 else None)
        except (TypeError, PeerNodeError) as err:
            return type(err).__name__
        return "no error"

    # Without the error being forwarded the followers would wait for the 30 s op timeout.
    assert spmd(3, rank, op_timeout=5.0) == ["TypeError", "PeerNodeError", "PeerNodeError"]


def test_bad_part_on_a_follower_fails_the_leader_of_fan_in() -> None:
    def rank(comm: Communicator) -> str:
        try:
            run_node("ClusterFanInImages", images(1) if comm.rank != 1 else "oops")
        except (TypeError, PeerNodeError) as err:
            return type(err).__name__
        return "ok"

    assert spmd(3, rank, op_timeout=5.0) == ["PeerNodeError", "TypeError", "ok"]


def test_two_nodes_met_in_different_orders_are_detected() -> None:
    full = images(4)

    def rank(comm: Communicator) -> None:
        node_id = "7" if comm.rank == 0 else "9"  # rank 1 runs another fan-out node first
        run_node("ClusterFanOutImage", full if comm.rank == 0 else None, unique_id=node_id)

    with pytest.raises(CollectiveMismatchError, match="ClusterFanOutImage#7"):
        spmd(2, rank, op_timeout=5.0)
