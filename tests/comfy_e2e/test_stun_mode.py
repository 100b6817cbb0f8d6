"""A 2-rank ComfyUI cluster whose ranks find each other through the rendezvous server
(``COMFY_CLUSTER_REGISTRATION_MODE=stun``, a real ``python -m stun`` on loopback): the world
forms, a cluster prompt runs, ClusterInfo names each peer's path, and the server lists both."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from comfyui_cluster.launchers.comfyui import ComfyCluster
from tests.comfy_e2e.comfy_client import ComfyClient
from tests.comfy_e2e.conftest import ComfyEnv, running_pair
from tests.stun.server_proc import ALPHA_KEY, StunProcess, serving

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def server() -> Iterator[StunProcess]:
    with serving() as proc:
        yield proc


@pytest.fixture(scope="module")
def pair(
    server: StunProcess, comfy_env: ComfyEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComfyCluster]:
    cluster_env = {
        "COMFY_CLUSTER_REGISTRATION_MODE": "stun",
        "COMFY_CLUSTER_STUN_SERVER": server.url,
        "COMFY_CLUSTER_CLUSTER_ID": "alpha",
        "COMFY_CLUSTER_KEY": ALPHA_KEY,
        "COMFY_CLUSTER_TIMEOUT": "60",
    }
    with running_pair(comfy_env, tmp_path_factory.mktemp("stun-pair"), cluster_env) as comfy:
        yield comfy


def test_a_cluster_prompt_runs_on_ranks_found_through_the_server(
    pair: ComfyCluster, server: StunProcess
) -> None:
    leader = ComfyClient(pair.leader_url, timeout=120)
    outputs = leader.run({"1": {"class_type": "ClusterInfo", "inputs": {}}}, timeout=180)
    text = outputs["1"]["text"][0]
    assert "connected: 2/2" in text, text
    assert any(word in text for word in ("punched", "direct", "relayed")), text
    members = httpx.get(
        f"{server.url}/v1/clusters/alpha/members", headers={"X-Cluster-Key": ALPHA_KEY}, timeout=10
    ).json()["members"]
    assert sorted(m["rank"] for m in members) == [0, 1], members
