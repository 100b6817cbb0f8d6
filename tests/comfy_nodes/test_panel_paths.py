"""The cluster panel's "path" per rank: the backend's real path to each peer (direct, punched,
relayed, and where its datagrams go), the leader's own view for every follower's row.

The communicator is a stand-in that answers what the panel asks of a udp one in stun discovery
(its state, its counters, its paths); comm.paths() itself is tested with the udp backend in
tests/backends.
"""

from __future__ import annotations

from typing import Any

from comfy_nodes import cluster
from comfy_nodes.server.membership import Membership
from comfy_nodes.server.messages import Message
from comfy_nodes.server.panel import Panel, _path
from tests.comfy_nodes.helpers import local_settings

PUNCHED = {"path": "punched", "address": ("203.0.113.7", 51820), "switches": 1}
RELAYED = {"path": "relayed", "address": ("198.51.100.1", 3478), "switches": 0}


class _UdpComm:
    backend = "udp"

    def __init__(self, rank: int, paths: dict[int, dict[str, Any]]) -> None:
        self.rank, self.size, self._paths = rank, 3, paths

    def peers(self) -> dict[int, str]:
        return {r: "ok" for r in range(self.size) if r != self.rank}

    def stats(self) -> dict[str, Any]:
        return {"mode": "stun", "bytes_in": 0, "bytes_out": 0, "paths": self._paths}

    def paths(self) -> dict[int, dict[str, Any]]:
        return self._paths


class _Runtime(cluster.Runtime):
    def __init__(self, comm: Any) -> None:
        super().__init__()
        self.comm = comm

    def peek(self) -> Any:
        return self.comm


class _Server:
    prompt_queue = None

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.sent.append((event, data))


def _ready(rank: int, comm: Any) -> Membership:
    membership = Membership(local_settings(rank, 3), f"http://r{rank}")
    membership.epoch, membership.state, membership._comm = 2, "ready", comm
    return membership


def test_the_leaders_rows_show_its_path_to_each_follower() -> None:
    comm = _UdpComm(0, {1: PUNCHED, 2: RELAYED})
    panel = Panel(_Server(), _ready(0, comm))
    # A follower's report carries its own view; the leader's row for it shows the leader's.
    status = {"activity": "idle", "boot": "b", "epoch": 2, "membership": "ready",
              "backend": "udp", "path": "udp direct 10.0.0.9:1 (stun)"}  # fmt: skip
    assert panel.heartbeat(Message(1, 2, "", {"status": status}))["ok"]
    with cluster.installed(_Runtime(comm)):
        rows = panel.snapshot()["rows"]
    assert [row["path"] for row in rows] == [
        "udp (stun)",
        "udp punched 203.0.113.7:51820 (stun)",
        "udp relayed via 198.51.100.1:3478 (stun)",
    ]


def test_a_follower_reports_its_path_to_the_leader() -> None:
    comm = _UdpComm(1, {0: RELAYED, 2: PUNCHED})
    panel = Panel(_Server(), _ready(1, comm))
    with cluster.installed(_Runtime(comm)):
        assert panel.report()["path"] == "udp relayed via 198.51.100.1:3478 (stun)"
        (row,) = panel.snapshot()["rows"]
    assert row["rank"] == 1 and row["path"] == "udp relayed via 198.51.100.1:3478 (stun)"


def test_paths_where_the_backend_gives_none() -> None:
    assert _path(None, None) is None
    assert _path("mpi", None, PUNCHED) == "mpi"  # its fabric routes
    assert _path("udp", "env") == "udp (env)"
    assert _path("udp", "static", {"path": "direct", "address": None}) == "udp direct (static)"
    assert _path("udp", None, {"path": "direct", "address": ["10.0.0.2", 4]}) == (
        "udp direct 10.0.0.2:4"
    )
