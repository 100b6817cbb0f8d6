"""A rank that is not there: prompts wait for it up to the join timeout, then fail naming it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from comfyui_cluster.launchers.comfyui import ComfyCluster
from tests.comfy_e2e.comfy_client import ComfyClient, ComfyError
from tests.comfy_e2e.conftest import ComfyEnv, running_pair

pytestmark = pytest.mark.comfy

JOIN_TIMEOUT_S = 6.0


@pytest.fixture(scope="module")
def pair(comfy_env: ComfyEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyCluster]:
    root = tmp_path_factory.mktemp("pair")
    cluster_env = {"COMFY_CLUSTER_TIMEOUT": "30", "COMFY_CLUSTER_JOIN_TIMEOUT": str(JOIN_TIMEOUT_S)}
    with running_pair(comfy_env, root, cluster_env) as comfy:
        yield comfy


def _status(leader: ComfyClient) -> dict[str, Any]:
    status: dict[str, Any] = leader.get_json("/cluster/status")
    return status


def _wait(leader: ComfyClient, state: str, epoch: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(leader)
        if status.get("state") == state and status.get("epoch", -1) >= epoch:
            return
        time.sleep(0.3)
    raise AssertionError(f"not {state} at epoch >= {epoch}: {_status(leader)}")


def test_missing_follower_is_named_then_joins_late(pair: ComfyCluster) -> None:
    leader = ComfyClient(pair.leader_url, timeout=60)
    _wait(leader, "ready", 0)
    info = {"1": {"class_type": "ClusterInfo", "inputs": {}}}
    pair.kill_rank(1)
    # The first prompt finds the dead peer (the world breaks) ...
    with pytest.raises(ComfyError) as first:
        leader.run(info, timeout=120)
    assert "rank(s) 1" in str(first.value) or "rank 1" in str(first.value), str(first.value)
    # ... the next one waits for it to join the new world, then names it.
    t0 = time.monotonic()
    with pytest.raises(ComfyError) as second:
        leader.run(info, timeout=120)
    waited = time.monotonic() - t0
    assert JOIN_TIMEOUT_S - 1 < waited < JOIN_TIMEOUT_S + 30, (waited, str(second.value)[-800:])
    text = str(second.value)
    assert "rank(s) 1 have not joined" in text and "COMFY_CLUSTER_JOIN_TIMEOUT" in text, text
    # Started late, the follower joins and the cluster runs again.
    pair.restart_rank(1)
    pair.wait_ready()
    _wait(leader, "ready", 1)
    outputs = leader.run(info, timeout=120)
    assert "connected: 2/2" in outputs["1"]["text"][0]
