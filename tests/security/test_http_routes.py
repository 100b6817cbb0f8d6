"""Strangers on the network cannot steer a cluster: the ranks' control messages are sealed
datagrams (comfy_nodes.server.seal, .messages), and ComfyUI's HTTP server carries none of them.

Two layers: the checks themselves on the pack's objects (fast), then a real 2-rank ComfyUI
cluster with a cluster key, probed as an attacker on the network would: the former rank-to-rank
HTTP routes, and datagrams to the follower's control port sealed with another key, replayed,
oversized or not sealed at all.  After all of it the state is unchanged and the next prompt runs.
(The datagram checks one by one: tests/comfy_nodes/test_control_channel.py.)
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from collectives.auth import ClusterKey
from collectives.errors import ConfigurationError
from comfy_nodes.server.membership import Membership
from comfy_nodes.server.messages import Refused, check_sender
from comfy_nodes.server.seal import MAX_DATAGRAM, Envelope, Seal
from comfy_nodes.server.settings import Settings
from tests.comfy_e2e.conftest import comfy_env, comfy_python  # noqa: F401  (fixtures)
from tests.comfy_nodes.helpers import local_settings

KEY = "test-cluster-key-" + "x" * 24
WRONG_KEY = "another-cluster-key-" + "y" * 24


def _settings(rank: int, size: int = 2) -> Settings:
    return local_settings(rank, size, key=ClusterKey(KEY))


class _Recorded(Membership):
    """A membership that records the worlds it is told to join instead of joining them."""

    def __init__(self, settings: Settings, epoch: int) -> None:
        super().__init__(settings, "http://127.0.0.1:1")
        self.epoch, self.state = epoch, "ready"
        self.joined: list[int] = []

    def rejoin(self, epoch: int, reason: str = "") -> None:
        self.joined.append(epoch)
        self.epoch, self.state = epoch, "joining"

    def leader_epoch(self, timeout: float = 3.0) -> int | None:
        return 7  # what the leader would answer


# -- the checks, on the pack's objects -----------------------------------------------------------
def test_who_may_send_what() -> None:
    check_sender("rejoin", 1, 3, 0)
    check_sender("abort", 1, 3, 0)
    check_sender("failed", 0, 3, 1)
    check_sender("abort", 0, 3, 2)
    check_sender("epoch", 0, 3, 2)
    for kind, me, sender, why in [
        ("rejoin", 1, 2, "from the leader only"),  # another follower is not the leader
        ("abort", 1, 2, "from the leader only"),
        ("failed", 1, 0, "does not take 'failed'"),  # a follower takes no failure reports
        ("rejoin", 0, 1, "does not take 'rejoin'"),  # the leader announces worlds
        ("abort", 1, 1, "not another rank"),  # itself
        ("abort", 1, 3, "not another rank"),  # not a rank of this cluster
        ("reboot", 1, 0, "does not take 'reboot'"),  # not in the table
    ]:
        with pytest.raises(Refused, match=why):
            check_sender(kind, me, 3, sender)


def test_a_rejoin_must_name_the_leaders_next_world() -> None:
    follower = _Recorded(_settings(1), 3)
    ok, why = follower.announced(10**9, "forged")
    assert not ok and "next world is 4" in why and follower.joined == [] and follower.epoch == 3
    assert follower.announced(3, "stale")[0] and follower.joined == []
    assert follower.announced(4, "the leader's next")[0] and follower.joined == [4]
    # Missed announcements (this rank was unreachable): believed when the leader confirms.
    assert follower.announced(7, "confirmed by the leader")[0] and follower.joined == [4, 7]


def test_a_key_is_needed_for_every_address_comfyui_listens_on() -> None:
    settings = _settings(1)
    settings.check_listen("0.0.0.0,::", {})  # with a key: anything
    keyless = dataclasses.replace(settings, key=None)
    keyless.check_listen("127.0.0.1,::1", {})
    keyless.check_listen(None, {})
    keyless.check_listen("0.0.0.0", {"COMFY_CLUSTER_INSECURE": "1"})
    for listen in ("0.0.0.0", "127.0.0.1,192.0.2.7", "::"):
        with pytest.raises(ConfigurationError, match="--listen"):
            keyless.check_listen(listen, {})


# -- a real cluster -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(
    comfy_env: Any,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    from tests.comfy_e2e.conftest import running_pair

    root = tmp_path_factory.mktemp("secure-pair")
    with running_pair(
        comfy_env, root, {"COMFY_CLUSTER_TIMEOUT": "30", "COMFY_CLUSTER_KEY": KEY}
    ) as comfy:
        yield comfy


def _request(url: str, path: str, body: bytes | None) -> int:
    req = urllib.request.Request(
        url + path, data=body, method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


def _status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/cluster/status", timeout=30) as resp:
        data: dict[str, Any] = json.load(resp)
    return data


def _ready(url: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(url)
        if status["state"] == "ready":
            return status
        time.sleep(0.3)
    raise AssertionError(f"not ready: {_status(url)}")


@pytest.mark.comfy
def test_a_real_cluster_refuses_strangers_and_runs_the_next_prompt(pair: Any) -> None:
    from tests.comfy_e2e.comfy_client import ComfyClient

    leader_url, follower_url = pair.url(0), pair.url(1)
    before = _ready(leader_url)
    epoch = before["epoch"]
    _ready(follower_url)
    # No rank-to-rank route on ComfyUI's HTTP server: nothing there to forge.
    rejoin = json.dumps({"rank": 0, "epoch": epoch + 1, "reason": "forged"}).encode()
    for path in ("/cluster/rejoin", "/cluster/abort", "/cluster/failed", "/cluster/command"):
        assert _request(follower_url, path, rejoin) in (404, 405), path
    assert _request(leader_url, "/cluster/epoch", None) in (404, 405)
    # The follower's control endpoint (the leader learned it when the world formed).
    host, port = before["control"]["1"].rsplit(":", 1)
    target = (host, int(port))
    forged = Seal(ClusterKey(WRONG_KEY)).seal(Envelope(0, "f1", "rejoin", False,
                                                       {"epoch": epoch + 1}))  # fmt: skip
    unsealed = Seal(None).seal(Envelope(0, "f2", "abort", False, {"epoch": epoch}))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in (forged, unsealed, b"CCC1" + b"\0" * MAX_DATAGRAM, b"\0" * 40):
            sock.sendto(datagram, target)
    time.sleep(1.0)
    for url in (leader_url, follower_url):
        status = _status(url)
        assert (status["state"], status["epoch"]) == ("ready", epoch), status
    outputs = ComfyClient(leader_url, timeout=60).run(
        {"1": {"class_type": "ClusterInfo", "inputs": {}}}, timeout=120
    )
    assert "connected: 2/2" in outputs["1"]["text"][0]
