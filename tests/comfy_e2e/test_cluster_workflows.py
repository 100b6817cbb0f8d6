"""One workflow over a 4-rank cluster of real ComfyUI servers (SPMD through the leader).

Prompts are queued on the leader's ordinary ``POST /prompt``; the node pack distributes them.
Results are compared exactly with the same workflow on one instance (SaveTensor writes the exact
values: SaveImage's 8-bit PNGs could not show a lost bit).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from comfyui_cluster.launchers.comfyui import ComfyCluster, ComfyClusterConfig, start_comfy_cluster
from tests.comfy_e2e.comfy_client import ComfyClient, ComfyError
from tests.comfy_e2e.conftest import TEST_NODES, ComfyEnv, free_port_range, make_base, tail

pytestmark = pytest.mark.comfy

RANKS = 4


@dataclass(frozen=True)
class Cluster:
    comfy: ComfyCluster
    leader: ComfyClient
    base: Path  # rank<i>/output/ holds what rank i saved
    log: Path


OP_TIMEOUT_S = 40.0
READY_TIMEOUT_S = 240.0


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def workflow_a(cluster: bool, batch: int = 8) -> dict[str, Any]:
    """EmptyLatentImage -> [FanOutLatent] -> KSampler -> VAEDecode -> [FanInImages] -> save."""
    wf = {
        "1": _node("UNETLoader", unet_name="tiny_sd15_unet.safetensors", weight_dtype="default"),
        "2": _node("ZeroConditioning", tokens=77, width=768),
        "3": _node("EmptyLatentImage", width=64, height=64, batch_size=batch),
        "4": _node("KSampler", model=["1", 0], seed=42, steps=3, cfg=2.0, sampler_name="euler",
                   scheduler="normal", positive=["2", 0], negative=["2", 0],
                   latent_image=["10", 0] if cluster else ["3", 0], denoise=1.0),
        "5": _node("VAELoader", vae_name="taesd"),
        "6": _node("VAEDecode", samples=["4", 0], vae=["5", 0]),
        "7": _node("SaveImage", images=["11", 0] if cluster else ["6", 0], filename_prefix="wf_a"),
        "8": _node("SaveTensor", value=["11", 0] if cluster else ["6", 0],
                   name=f"wf_a_{'cluster' if cluster else 'single'}"),
    }  # fmt: skip
    if cluster:
        wf["10"] = _node("ClusterFanOutLatent", samples=["3", 0])
        wf["11"] = _node("ClusterFanInImages", images=["6", 0])
    return wf


@pytest.fixture(scope="module")
def cluster(comfy_env: ComfyEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster4")
    log_path = root / "cluster.log"
    config = ComfyClusterConfig(
        nproc=RANKS,
        port=free_port_range(RANKS),
        base_directory=str(make_base(root / "base", comfy_env.models)),
        python=comfy_env.python,
        backend="udp",
        extra_custom_nodes=[str(TEST_NODES)],
        ready_timeout_s=READY_TIMEOUT_S,
        env={"COMFY_CLUSTER_TIMEOUT": str(OP_TIMEOUT_S), "COMFY_CLUSTER_JOIN_TIMEOUT": "120"},
    )
    with log_path.open("w", buffering=1) as log:
        comfy = start_comfy_cluster(config, stdout=log)
        try:
            comfy.wait_ready()
            leader = ComfyClient(comfy.leader_url, timeout=60)
            _wait_cluster_state(leader, epoch=0)
            yield Cluster(comfy, leader, Path(config.base_directory or ""), log_path)
        finally:
            comfy.stop()


def _wait_cluster_state(leader: ComfyClient, epoch: int, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = leader.get_json("/cluster/status")
        except (ComfyError, OSError):
            status = {}
        if status.get("state") == "ready" and status.get("epoch", -1) >= epoch:
            return status
        time.sleep(0.5)
    raise AssertionError(f"cluster not ready at epoch >= {epoch}: {status}")


def _saved(base: Path, rank: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(base / f"rank{rank}" / "output" / f"{name}.safetensors"))


def test_workflow_a_on_four_ranks_equals_one_instance(cluster: Cluster) -> None:
    leader = cluster.leader
    base = cluster.base
    log = cluster.log
    t0 = time.monotonic()
    outputs = leader.run(workflow_a(cluster=True), timeout=300)
    cluster_s = time.monotonic() - t0
    assert len(outputs["7"]["images"]) == 8, tail(log)
    single = leader.run(workflow_a(cluster=False), timeout=300)
    assert len(single["7"]["images"]) == 8
    got = _saved(base, 0, "wf_a_cluster")["value"]
    want = _saved(base, 0, "wf_a_single")["value"]
    assert got.shape == want.shape == (8, 64, 64, 3) and got.dtype == want.dtype
    # Same seed, same batch_index: the same noise per image; only float rounding of batched
    # convolutions of another batch size may differ.
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.equal(got[0], got[1]), "images of a batch must differ (distinct noise)"
    # Followers ran only what the cluster nodes need: no SaveImage output on them.
    for rank in range(1, RANKS):
        assert not list((base / f"rank{rank}" / "output").glob("wf_a*")), f"rank {rank} saved"
    print(f"workflow a on {RANKS} ranks: {cluster_s:.1f} s")


def test_followers_do_not_evaluate_leader_inputs(cluster: Cluster) -> None:
    # What feeds a broadcast's or a fan-out's input runs on the leader only (the input is lazy);
    # a collective feeding a leader input still runs on every rank (the broadcast here, which
    # the fan-out's image comes from); what the followers need (after the fan-out) runs
    # everywhere.
    wf = {
        "1": _node("IndexedImages", batch=4, size=8, dtype="float32"),
        "2": _node("RecordRun", images=["1", 0], name="lazy_upstream"),
        "3": _node("ClusterBroadcastTensor", tensor=["2", 0]),
        "4": _node("ClusterFanOutImage", image=["3", 0]),
        "5": _node("RecordRun", images=["4", 0], name="lazy_slice"),
        "6": _node("ClusterFanInImages", images=["5", 0]),
        "7": _node("SaveTensor", value=["6", 0], name="lazy_fan"),
        "8": _node("SaveTensor", value=["1", 0], name="lazy_source"),
    }
    cluster.leader.run(wf, timeout=120)
    base = cluster.base
    source = _saved(base, 0, "lazy_source")["value"]
    assert source.shape == (4, 8, 8, 3)
    assert torch.equal(_saved(base, 0, "lazy_fan")["value"], source)
    for rank in range(RANKS):
        out = base / f"rank{rank}" / "output"
        assert (out / "lazy_slice.ran").exists(), f"rank {rank} did not run its slice's node"
        ran_upstream = (out / "lazy_upstream.ran").exists()
        assert ran_upstream == (rank == 0), f"rank {rank}: upstream ran: {ran_upstream}"


def test_image_mask_latent_and_list_paths_are_exact(cluster: Cluster) -> None:
    leader = cluster.leader
    base = cluster.base
    wf = {
        "1": _node("IndexedImages", batch=6, size=16, dtype="float16"),
        # images: fan-out, work, gather (everyone) and fan-in (leader)
        "2": _node("ClusterFanOutImage", image=["1", 0]),
        "3": _node("SleepPerImage", images=["2", 0], seconds_per_image=0.0),
        "4": _node("ClusterGatherImages", images=["3", 0]),
        "5": _node("ClusterFanInImages", images=["3", 0]),
        "6": _node("SaveTensor", value=["4", 0], name="gathered"),
        "7": _node("SaveTensor", value=["5", 0], name="fanin"),
        # masks
        "8": _node("ClusterFanOutMask", mask=["1", 1]),
        "9": _node("ClusterFanInMask", mask=["8", 0]),
        "10": _node("SaveTensor", value=["9", 0], name="masks"),
        # latents keep every key
        "11": _node("EmptyLatentImage", width=64, height=64, batch_size=5),
        "12": _node("ClusterFanOutLatent", samples=["11", 0]),
        "13": _node("ClusterFanInLatent", samples=["12", 0]),
        "14": _node("SaveTensor", value=["13", 0], name="latent"),
        # broadcast keeps the batch dimension
        "15": _node("ClusterBroadcastTensor", tensor=["1", 0]),
        "16": _node("ClusterGatherImages", images=["15", 0]),
        "17": _node("SaveTensor", value=["16", 0], name="broadcast"),
        # each rank its work items, back in order
        "18": _node("ClusterGetInstanceWorkItemFromBatch", batch=["1", 0], index_offset=0),
        "19": _node("ClusterFanInImages", images=["18", 0]),
        "20": _node("SaveTensor", value=["19", 0], name="workitems"),
        # list utilities on the leader
        "21": _node("ClusterSplitBatchToList", batch=["1", 0]),
        "22": _node("ClusterStridedReorder", list=["21", 0], stride=2),
        "23": _node("ClusterFlattenBatchedImageList", images=["22", 0]),
        "24": _node("SaveTensor", value=["23", 0], name="reordered"),
    }
    leader.run(wf, timeout=300)
    g = torch.Generator().manual_seed(6 * 1000 + 16)
    images = torch.rand((6, 16, 16, 3), generator=g).to(torch.float16)
    masks = torch.rand((6, 16, 16), generator=g)
    for name in ("gathered", "fanin", "workitems"):
        got = _saved(base, 0, name)["value"]
        assert got.dtype == torch.float16 and torch.equal(got, images), name
    assert torch.equal(_saved(base, 0, "masks")["value"], masks)
    lat = _saved(base, 0, "latent")
    assert lat["samples"].shape == (5, 4, 8, 8)
    broadcast = _saved(base, 0, "broadcast")["value"]
    assert torch.equal(broadcast, torch.cat([images] * RANKS)), "every rank had all 6 images"
    reordered = _saved(base, 0, "reordered")["value"]
    assert torch.equal(reordered, images[[0, 2, 4, 1, 3, 5]])


def test_follower_refusal_names_the_rank_and_the_missing_item(cluster: Cluster) -> None:
    leader = cluster.leader
    wf = {
        "1": _node("RankLocalModel", model="model-of-rank-0"),  # exists on the leader only
        "2": _node("ClusterInfo", trigger=["1", 0]),
    }
    with pytest.raises(ComfyError) as info:
        leader.run(wf, timeout=120)
    text = str(info.value)
    assert "rank 1" in text and "model-of-rank-0" in text, text
    # a refused prompt ran nowhere, and the cluster still works
    _wait_cluster_state(leader, epoch=0)
    outputs = leader.run({"1": _node("ClusterInfo")}, timeout=120)
    assert f"connected: {RANKS}/{RANKS}" in outputs["1"]["text"][0]


def test_killed_follower_fails_the_prompt_then_rejoins(cluster: Cluster) -> None:
    comfy = cluster.comfy
    leader = cluster.leader
    log = cluster.log
    epoch = _wait_cluster_state(leader, epoch=0)["epoch"]
    wf = {
        "1": _node("IndexedImages", batch=8, size=8, dtype="float32"),
        "2": _node("ClusterFanOutImage", image=["1", 0]),
        "3": _node("SleepPerImage", images=["2", 0], seconds_per_image=2.0),
        "4": _node("ClusterFanInImages", images=["3", 0]),
        "5": _node("SaveTensor", value=["4", 0], name="killed"),
    }
    prompt_id = leader.queue_prompt(wf)
    time.sleep(2.0)  # every rank is inside SleepPerImage now
    comfy.kill_rank(2)
    t0 = time.monotonic()
    with pytest.raises(ComfyError) as info:
        leader.wait(prompt_id, timeout=OP_TIMEOUT_S + 60)
    waited = time.monotonic() - t0
    assert waited < OP_TIMEOUT_S + 30, f"the prompt failed only after {waited:.0f} s"
    assert "rank 2" in str(info.value) or "rank(s) 2" in str(info.value), str(info.value)
    comfy.restart_rank(2)
    comfy.wait_ready()
    _wait_cluster_state(leader, epoch=epoch + 1)
    outputs = leader.run(workflow_a(cluster=True, batch=4), timeout=300)
    assert len(outputs["7"]["images"]) == 4, tail(log)


def test_interrupt_on_a_follower_aborts_the_prompt_everywhere(cluster: Cluster) -> None:
    comfy, leader = cluster.comfy, cluster.leader
    epoch = _wait_cluster_state(leader, epoch=0)["epoch"]
    wf = {
        "1": _node("IndexedImages", batch=8, size=8, dtype="float32"),
        "2": _node("ClusterFanOutImage", image=["1", 0]),
        "3": _node("SleepPerImage", images=["2", 0], seconds_per_image=2.0),
        "4": _node("ClusterFanInImages", images=["3", 0]),
        "5": _node("SaveTensor", value=["4", 0], name="interrupted"),
    }
    prompt_id = leader.queue_prompt(wf)
    time.sleep(2.0)  # every rank is inside SleepPerImage now
    ComfyClient(comfy.urls[1]).request("/interrupt", {})
    t0 = time.monotonic()
    with pytest.raises(ComfyError) as info:
        leader.wait(prompt_id, timeout=OP_TIMEOUT_S + 60)
    assert time.monotonic() - t0 < OP_TIMEOUT_S, "the interrupt must not wait for a timeout"
    assert "interrupted on rank 1" in str(info.value), str(info.value)
    _wait_cluster_state(leader, epoch=epoch + 1)
    outputs = leader.run({"1": _node("ClusterInfo")}, timeout=120)
    assert f"connected: {RANKS}/{RANKS}" in outputs["1"]["text"][0]
