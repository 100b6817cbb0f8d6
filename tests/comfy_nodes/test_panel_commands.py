"""The panel's controls (the leader asks a follower to interrupt or free memory) as ``command``
control messages between real control endpoints (UdpCarrier on 127.0.0.1), through the pack's
own dispatch (comfy_nodes.server.messages) and Panel.command.

Only ComfyUI's ``nodes.interrupt_processing`` and its prompt queue are stand-ins; the same
controls run on a real pair of ComfyUI servers in tests/browser/test_cluster_ui.py.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from collectives.auth import ClusterKey
from comfy_nodes.server import panel as panel_module
from comfy_nodes.server.carrier import Address, ControlUnreachableError, UdpCarrier
from comfy_nodes.server.membership import Membership
from comfy_nodes.server.messages import dispatch
from comfy_nodes.server.panel import Panel
from comfy_nodes.server.peers import ControlRefusedError, Peers
from comfy_nodes.server.seal import Envelope, Seal
from tests.comfy_nodes.helpers import local_settings

KEY = ClusterKey("k" * 40)


class _Queue:
    def __init__(self) -> None:
        self.flags: dict[str, Any] = {}

    def set_flag(self, name: str, value: Any) -> None:
        self.flags[name] = value

    def get_tasks_remaining(self) -> int:
        return 0


class _Server:
    def __init__(self) -> None:
        self.prompt_queue = _Queue()

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        pass


@pytest.fixture
def interrupts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """ComfyUI's ``nodes.interrupt_processing``, as a stand-in."""
    pressed: list[bool] = []
    nodes = types.ModuleType("nodes")
    nodes.interrupt_processing = pressed.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nodes", nodes)
    return pressed


class _Rank:
    """One rank's control endpoint, membership and panel (no world formed: commands need none)."""

    def __init__(self, rank: int, size: int = 2, key: ClusterKey = KEY) -> None:
        settings = local_settings(rank, size, key=key)
        self.peers = Peers(rank)
        self.membership = Membership(settings, f"http://r{rank}", self.peers)
        self.server = _Server()
        self.panel = Panel(self.server, self.membership)

        def on_request(envelope: Envelope, source: Address) -> dict[str, Any]:
            return dispatch(
                self.membership, self.panel, envelope.sender, envelope.kind, envelope.body
            )

        self.carrier = UdpCarrier(
            rank, ("127.0.0.1", 0), Seal(key), on_request, port_env="COMFY_CLUSTER_CONTROL_PORT"
        )
        self.peers.carrier = self.carrier

    def knows(self, *others: _Rank) -> None:
        for other in others:
            self.peers.learn(other.peers.rank, other.carrier.address)


@pytest.fixture
def ranks() -> Iterator[list[_Rank]]:
    made: list[_Rank] = []
    yield made
    for rank in made:
        rank.carrier.close()


def test_the_leaders_sealed_command_runs_on_the_follower(
    interrupts: list[bool], ranks: list[_Rank]
) -> None:
    leader, follower = _Rank(0), _Rank(1)
    ranks += [leader, follower]
    leader.knows(follower)
    reply = leader.peers.request(1, "command", {"epoch": 0, "action": "interrupt"}, 5.0)
    assert reply["done"] == "interrupted" and interrupts == [True]
    leader.peers.request(1, "command", {"epoch": 0, "action": "free"}, 5.0)
    assert follower.server.prompt_queue.flags == {"unload_models": True, "free_memory": True}
    # What the follower's next heartbeat tells the leader's panel.
    assert follower.panel.report()["commands"] == {"interrupt": 1, "free": 1}


def test_a_command_sealed_with_another_key_is_dropped_and_counted(
    interrupts: list[bool], ranks: list[_Rank]
) -> None:
    leader, follower = _Rank(0, key=ClusterKey("x" * 40)), _Rank(1)
    ranks += [leader, follower]
    leader.knows(follower)
    with pytest.raises(ControlUnreachableError, match=r"rank 1 at udp 127\.0\.0\.1:\d+ did not"):
        leader.peers.request(1, "command", {"epoch": 0, "action": "interrupt"}, 0.6)
    assert follower.carrier.dropped["auth"] >= 1
    assert interrupts == [] and follower.panel.commands == {"interrupt": 0, "free": 0}


def test_a_follower_cannot_command_another_follower(
    interrupts: list[bool], ranks: list[_Rank]
) -> None:
    one, two = _Rank(1, 3), _Rank(2, 3)
    ranks += [one, two]
    one.knows(two)
    with pytest.raises(ControlRefusedError, match="takes it from the leader only, not rank 1"):
        one.peers.request(2, "command", {"epoch": 0, "action": "interrupt"}, 5.0)
    assert interrupts == []


def test_the_leader_takes_no_command(interrupts: list[bool], ranks: list[_Rank]) -> None:
    leader, follower = _Rank(0), _Rank(1)
    ranks += [leader, follower]
    follower.knows(leader)
    with pytest.raises(ControlRefusedError, match="it does not take 'command'"):
        follower.peers.request(0, "command", {"epoch": 0, "action": "interrupt"}, 5.0)
    assert interrupts == []


@pytest.mark.parametrize("body", [{"action": "reboot"}, {}, {"action": 1}])
def test_an_unknown_action_is_refused(
    interrupts: list[bool], ranks: list[_Rank], body: dict[str, Any]
) -> None:
    leader, follower = _Rank(0), _Rank(1)
    ranks += [leader, follower]
    leader.knows(follower)
    with pytest.raises(ControlRefusedError, match="'action' must be one of"):
        leader.peers.request(1, "command", {"epoch": 0, **body}, 5.0)
    assert interrupts == [] and follower.panel.commands == {"interrupt": 0, "free": 0}


def test_the_leader_runs_a_control_here_and_reports_which_followers_took_it(
    interrupts: list[bool], ranks: list[_Rank], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(panel_module, "COMMAND_TIMEOUT_S", 1.0)
    leader, one = _Rank(0, 4), _Rank(1, 4)
    other_key = _Rank(2, 4, key=ClusterKey("y" * 40))  # a follower with another key
    ranks += [leader, one, other_key]
    leader.knows(one, other_key)
    leader.peers.learn(3, ("127.0.0.1", 9))  # nobody answers there (the discard port)
    result = leader.panel.everywhere("free")
    assert result["sent_to"] == [1] and not result["ok"]
    assert sorted(result["failed"]) == ["2", "3"]
    assert "rank 2 at udp 127.0.0.1" in result["failed"]["2"]
    assert "rank 3 at udp 127.0.0.1:9 did not answer a 'command'" in result["failed"]["3"]
    assert leader.panel.commands == {"interrupt": 0, "free": 1}  # done here all the same
    assert one.panel.commands == {"interrupt": 0, "free": 1}
    assert other_key.panel.commands == {"interrupt": 0, "free": 0}


def test_a_followers_heartbeat_reaches_the_leaders_panel(ranks: list[_Rank]) -> None:
    leader, follower = _Rank(0), _Rank(1)
    ranks += [leader, follower]
    follower.knows(leader)
    follower.panel.beat()
    assert follower.panel.leader_error == ""
    assert leader.panel.health.reported(1)["boot"] == follower.panel.boot
