"""ClusterInfo and the memory nodes."""

from __future__ import annotations

from typing import Any

from collectives import Communicator
from comfy_nodes import memory
from comfy_nodes.cluster import ClusterStatus

from .helpers import run_node, spmd


def test_info_reports_rank_size_backend_and_peers() -> None:
    def rank(comm: Communicator) -> dict[str, Any]:
        out = run_node("ClusterInfo")
        comm.barrier()  # every rank asks while all are still there
        return out

    results = spmd(3, rank)
    for r, out in enumerate(results):
        text, rank_, size, connected = out["result"]
        assert (rank_, size, connected) == (r, 3, 3)
        assert out["ui"]["text"] == [text]
        assert f"rank {r} of 3" in text and "backend local" in text and "connected: 3/3" in text
    assert "(leader)" in results[0]["result"][0] and "(follower)" in results[1]["result"][0]


def test_info_counts_lost_peers() -> None:
    status = ClusterStatus(0, 3, "udp", {1: "ok", 2: "lost"})
    assert status.connected == 2
    assert "rank 2: lost" in status.text() and "connected: 2/3" in status.text()


def test_free_nodes_pass_the_trigger_through() -> None:
    marker = object()
    assert run_node("ClusterFreeNow", marker)[0] is marker
    assert run_node("ClusterFinallyFree", marker)[0] is marker
    assert run_node("ClusterFreeNow")[0] is None


def test_free_without_comfyui_collects_garbage_now() -> None:
    assert memory.free_now()[0].startswith("gc collected")
    assert memory.free_when_finished()[0].endswith("freeing now")
