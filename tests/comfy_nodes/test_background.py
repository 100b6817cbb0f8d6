"""The root of a scatter or broadcast leaves it running inside a cluster prompt; the tail waits."""

from __future__ import annotations

import threading

import pytest
import torch

from collectives import CollectivesError, Communicator
from comfy_nodes import cluster, collective, recycled

from .helpers import images, run_node, spmd


def _in_prompt(comm: Communicator) -> None:
    cluster.runtime().background[comm] = []  # what ClusterSync's head does for the running prompt


@pytest.mark.parametrize("size", [2, 4])
def test_leader_does_not_wait_for_its_fan_out_and_results_stay_exact(size: int) -> None:
    full = images(7)
    gate = threading.Event()  # followers receive only once the leader's fan-out has returned

    def rank(comm: Communicator) -> tuple[torch.Tensor, torch.Tensor, int]:
        _in_prompt(comm)
        try:
            if comm.rank != 0:
                assert gate.wait(30)
            mine = run_node("ClusterFanOutImage", full if comm.rank == 0 else None)[0]
            if comm.rank == 0:
                left = len(cluster.runtime().background[comm])
                gate.set()
            else:
                left = 0
            value = run_node("ClusterBroadcastTensor", mine if comm.rank == 0 else None)[0]
            back = run_node("ClusterFanInImages", mine * 2)[0]
            collective.settle(comm)
            return back, value, left
        finally:
            cluster.runtime().background.pop(comm, None)

    results = spmd(size, rank)
    leader_back, _, left = results[0]
    assert left == 1  # the fan-out was still in flight when the leader moved on
    assert torch.equal(leader_back, full * 2)
    for _, value, _ in results:
        assert torch.equal(value, results[0][1])


def test_an_unsendable_value_fails_every_rank_at_once_naming_node_and_type() -> None:
    def rank(comm: Communicator) -> str:
        try:
            value = (lambda: None) if comm.rank == 0 else None
            run_node("ClusterBroadcastTensor", value, unique_id="12")
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return "no error"

    leader, follower = spmd(2, rank, op_timeout=5.0)
    assert leader.startswith("TypeError: ClusterBroadcastTensor#12") and "function" in leader
    assert follower.startswith("PeerNodeError") and "rank 0 failed" in follower, follower


def test_a_value_the_codec_refuses_names_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    from comfy_nodes import distribute

    # Past the node's own check, the codec refuses the value (it never pickles).
    monkeypatch.setattr(distribute, "check_sendable", lambda *args: None)

    def rank(comm: Communicator) -> str:
        _in_prompt(comm)
        try:
            # The leader's value cannot be encoded: its broadcast fails (at once or at settle).
            value = (lambda: None) if comm.rank == 0 else None
            run_node("ClusterBroadcastTensor", value, unique_id="12")
            collective.settle(comm)
        except CollectivesError as err:
            return "\n".join([type(err).__name__, str(err), *getattr(err, "__notes__", [])])
        finally:
            cluster.runtime().background.pop(comm, None)
        return "no error"

    leader, follower = spmd(2, rank, op_timeout=2.0)
    assert "ClusterBroadcastTensor#12" in leader and "CodecError" in leader, leader
    assert follower.startswith(("CollectiveTimeoutError", "ConnectionLostError")), follower


@pytest.mark.parametrize("in_prompt", [True, False])
def test_the_leaders_own_fan_out_slice_is_a_copy_made_after_the_others_are_sent(
    in_prompt: bool,
) -> None:
    # The leader clones its slice only once the scatter is issued (the followers do not wait for
    # that copy); writing to what it got must still leave its input, and what the others got,
    # untouched, for IMAGE and LATENT alike.
    full = images(6)
    latent = {"samples": torch.arange(6 * 4 * 2 * 2, dtype=torch.float32).reshape(6, 4, 2, 2)}
    before_images, before_samples = full.clone(), latent["samples"].clone()

    def rank(comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:
        if in_prompt:
            _in_prompt(comm)
        try:
            mine = run_node("ClusterFanOutImage", full if comm.rank == 0 else None)[0]
            part = run_node("ClusterFanOutLatent", latent if comm.rank == 0 else None)[0]
            if comm.rank == 0:
                mine.add_(100)
                part["samples"].add_(100)
            collective.settle(comm)
            return mine, part["samples"]
        finally:
            cluster.runtime().background.pop(comm, None)

    results = spmd(3, rank)
    assert torch.equal(full, before_images) and torch.equal(latent["samples"], before_samples)
    assert torch.equal(results[0][0], before_images[:2] + 100)
    assert torch.equal(results[0][1], before_samples[:2] + 100)
    for r in (1, 2):
        assert torch.equal(results[r][0], before_images[2 * r : 2 * r + 2])
        assert torch.equal(results[r][1], before_samples[2 * r : 2 * r + 2])


def test_the_leaders_large_fan_out_slice_is_copied_into_recycled_memory() -> None:
    # A clone's fresh pages cost the leader a page fault each, every prompt: a slice of 1 MiB
    # or more goes into recycled memory instead (comfy_nodes.recycled), still a copy.
    full = torch.rand(4, 256, 256, 3)  # 1.5 MiB per rank at 2 ranks

    def rank(comm: Communicator) -> tuple[torch.Tensor, int]:
        try:
            in_use = recycled.stats()[0]
            mine = run_node("ClusterFanOutImage", full if comm.rank == 0 else None)[0]
            collective.settle(comm)
            return mine, recycled.stats()[0] - in_use
        finally:
            cluster.runtime().background.pop(comm, None)

    (mine, grown), (theirs, _) = spmd(2, rank)
    assert torch.equal(mine, full[:2]) and torch.equal(theirs, full[2:])
    assert mine.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
    assert grown >= mine.nbytes
