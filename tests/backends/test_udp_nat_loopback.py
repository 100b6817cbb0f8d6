"""``stun`` discovery of the udp backend against the real rendezvous server (``python -m stun``
under uvicorn, on 127.0.0.1): the HTTP client's routes and errors, a world that forms over the
relay and moves to the direct path, a world kept on the relay, and the attacker's view of the
relay (a datagram from an unknown source) and of punch hints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from collectives.auth import ClusterKey
from collectives.communicator import Communicator
from collectives.errors import ConfigurationError, RendezvousConnectionError
from collectives.rendezvous.stun_client import (
    Candidate,
    StunAuthError,
    StunClient,
    StunConflictError,
    server_url,
)
from collectives.world import init
from tests.backends.udp_worlds import run_world

REPO = Path(__file__).resolve().parents[2]
KEY = "nat-loopback-test-key-0123456789abcdef"
CLUSTER = "natloop"
ADMIN = "nat-loopback-admin-key-0123456789"
CLUSTERS = (CLUSTER, "routes", "world3", "relayonly", "attack")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    udp: tuple[str, int]
    proc: subprocess.Popen[bytes]

    def counters(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/v1/stats", headers={"X-Admin-Key": ADMIN}, timeout=5.0)
        return dict(answer.json()["udp"])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    http, udp = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    keys = ",".join(f"{c}:{KEY}" for c in CLUSTERS)
    env = dict(os.environ, COMFY_CLUSTER_AUTH_KEYS=keys, COMFY_CLUSTER_STUN_LOG_LEVEL="warning",
               COMFY_CLUSTER_STUN_ADMIN_KEY=ADMIN)  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "stun", "--host", "127.0.0.1", "--port", str(http),
         "--udp-host", "127.0.0.1", "--udp-port", str(udp)],
        cwd=REPO, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{http}"
    try:
        end = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the rendezvous server exited"
            assert time.monotonic() < end, "the rendezvous server did not start"
            time.sleep(0.1)
        yield Server(url, ("127.0.0.1", udp), proc)
    finally:
        proc.terminate()
        proc.wait(10)


def nat_env(server: Server, cluster: str = CLUSTER, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "COMFY_CLUSTER_REGISTRATION_MODE": "stun",
        "COMFY_CLUSTER_STUN_SERVER": server.url,
        "COMFY_CLUSTER_CLUSTER_ID": cluster,
        "COMFY_CLUSTER_KEY": KEY,
        "COMFY_CLUSTER_LISTEN_ADDRESS": "127.0.0.1",
        **extra,
    }


# -- the HTTP client ---------------------------------------------------------------------------
def test_wrong_key_and_unknown_cluster_name_the_variables(server: Server) -> None:
    for cluster, key in (("routes", KEY + "-wrong"), ("nosuchcluster", KEY)):
        client = StunClient(server.url, cluster, ClusterKey(key), environ={})
        try:
            with pytest.raises(StunAuthError, match=r"COMFY_CLUSTER_KEY.*COMFY_CLUSTER_CLUSTER_ID"):
                client.join("a", rank=0, world_size=2, candidates=[])
        finally:
            client.close()


def test_client_join_members_heartbeat_leave(server: Server) -> None:
    client = StunClient(server.url, CLUSTER, ClusterKey(KEY), environ={})
    try:
        joined = client.join("inst-a", rank=5, world_size=None, candidates=[
            Candidate("127.0.0.1", 4000)])  # fmt: skip
        assert joined.rank == 5 and len(joined.token) == 16 and len(joined.handle) == 8
        assert joined.udp is not None and joined.udp[1] == server.udp[1]
        members = client.members()
        mine = members.by_rank()[5]
        assert mine.instance_id == "inst-a"
        assert [c.address() for c in mine.candidates] == [("127.0.0.1", 4000)]
        with pytest.raises(StunConflictError, match="RANK"):
            client.join("inst-b", rank=5, world_size=None, candidates=[])
        generation = client.heartbeat("inst-a")
        assert generation >= members.generation
        # A long-poll with nothing new returns at its timeout, not before.
        start = time.monotonic()
        same = client.members(after_generation=generation + 10**6, timeout_s=0.5)
        assert time.monotonic() - start >= 0.4
        assert same.generation <= generation + 10**6
        client.leave("inst-a")
        assert 5 not in client.members().by_rank()
    finally:
        client.close()


def test_client_errors_name_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_STUN_SERVER"):
        server_url("", {})
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_STUN_ALLOW_HTTP"):
        server_url("http://10.1.2.3:8089", {})
    assert server_url("http://10.1.2.3:8089", {"COMFY_CLUSTER_STUN_ALLOW_HTTP": "1"})
    assert server_url("stun.example.org", {}) == "https://stun.example.org"
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_KEY"):
        StunClient.from_env({"COMFY_CLUSTER_STUN_SERVER": "https://x"}, None)
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_CLUSTER_ID"):
        StunClient.from_env({"COMFY_CLUSTER_STUN_SERVER": "https://x"}, ClusterKey(KEY))
    port = _free_port(socket.SOCK_STREAM)  # nothing listens there
    client = StunClient(f"http://127.0.0.1:{port}", "x", ClusterKey(KEY), timeout=2.0,
                        environ={})  # fmt: skip
    with pytest.raises(RendezvousConnectionError, match="COMFY_CLUSTER_STUN_SERVER"):
        client.members()
    client.close()


def test_stun_mode_needs_its_variables(server: Server) -> None:
    env = nat_env(server)
    for missing in ("COMFY_CLUSTER_CLUSTER_ID", "COMFY_CLUSTER_STUN_SERVER", "COMFY_CLUSTER_KEY"):
        broken = {k: v for k, v in env.items() if k != missing}
        with pytest.raises(ConfigurationError, match=missing):
            init("udp", rank=0, size=2, environ=broken, timeout=3.0)


# -- worlds ------------------------------------------------------------------------------------
def _exercise(comm: Communicator) -> dict[str, Any]:
    payload = np.arange(3 << 18, dtype=np.float32) if comm.rank == 0 else None
    got = comm.broadcast(payload, root=0)
    assert np.array_equal(got, np.arange(3 << 18, dtype=np.float32))
    total = comm.allreduce(np.full(1000, comm.rank + 1, dtype=np.int64))
    assert int(total[0]) == sum(range(1, comm.size + 1))
    assert comm.allgather(comm.rank) == list(range(comm.size))
    stats: dict[str, Any] = comm.stats()
    return stats


def test_world_forms_over_the_relay_then_goes_direct(server: Server) -> None:
    def body(comm: Communicator) -> dict[str, Any]:
        first = _exercise(comm)["paths"]
        end = time.monotonic() + 5
        while time.monotonic() < end:
            paths = comm.stats()["paths"]
            if all(p["path"] == "direct" for p in paths.values()):
                break
            time.sleep(0.05)
        comm.barrier()
        stats = _exercise(comm)
        return {"first": first, "stats": stats}

    out = run_world(3, nat_env(server, COMFY_CLUSTER_CLUSTER_ID="world3"), body)
    for rank, result in enumerate(out):
        paths = result["stats"]["paths"]
        assert set(paths) == set(range(3)) - {rank}
        for info in paths.values():
            assert info["path"] == "direct", paths
            assert info["direct_after_s"] is not None and info["direct_after_s"] < 3.0
        assert result["stats"]["stun_answers"] >= 1
    assert any(r["stats"]["relayed_out"] > 0 for r in out)  # the handshake went by the relay


def test_world_kept_on_the_relay(server: Server) -> None:
    before = server.counters().get("relay_forwarded", 0)

    def body(comm: Communicator) -> dict[str, Any]:
        return _exercise(comm)

    env = nat_env(server, COMFY_CLUSTER_CLUSTER_ID="relayonly", COMFY_CLUSTER_NAT_DIRECT="0")
    out = run_world(2, env, body)
    for stats in out:
        assert all(p["path"] == "relayed" for p in stats["paths"].values())
        assert stats["relayed_in"] > 0 and stats["relayed_out"] > 0
    # The 3 MiB broadcast crossed the relay, datagram by datagram.
    assert server.counters()["relay_forwarded"] - before > (3 << 20) // 1200
