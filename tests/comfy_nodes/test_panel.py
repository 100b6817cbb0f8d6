"""The cluster panel's server side without a browser: the health table with time driven by hand,
the reports, the routes' table, per-prompt weights and the heartbeat settings."""

from __future__ import annotations

from typing import Any

import pytest

from collectives.errors import ConfigurationError
from comfy_nodes.server.health import Health, classify, fix_for
from comfy_nodes.server.integration import with_weights
from comfy_nodes.server.membership import Membership
from comfy_nodes.server.messages import Message, Refused, check_sender
from comfy_nodes.server.panel import (
    STATUS_EVENT,
    TRANSITION_EVENT,
    Panel,
    Progress,
    Rates,
    first_beat_s,
)
from comfy_nodes.server.settings import Settings
from tests.comfy_nodes.helpers import local_settings

BEAT, TIMEOUT = 1.0, 5.0


@pytest.mark.parametrize(
    ("age", "watched", "reported", "state"),
    [
        (None, 0.0, "idle", "starting"),  # never heard from
        (None, TIMEOUT, "idle", "lost"),  # never heard from, for the whole timeout
        (0.5, 9.0, "idle", "idle"),
        (0.5, 9.0, "executing", "executing"),
        (0.5, 9.0, "starting", "starting"),
        (0.5, 9.0, "nonsense", "starting"),  # a rank cannot claim a state of the leader's
        (2.5 * BEAT, 9.0, "idle", "unreachable"),
        (TIMEOUT, 9.0, "executing", "lost"),
    ],
)
def test_one_table_decides_a_ranks_state(
    age: float | None, watched: float, reported: str, state: str
) -> None:
    assert classify(age, watched, reported, BEAT, TIMEOUT) == state


def test_a_silent_rank_goes_unreachable_then_lost_and_comes_back() -> None:
    h = Health(2, BEAT, TIMEOUT, now=100.0)
    assert [r["state"] for r in h.rows(100.0)] == ["starting", "starting"]
    changes = h.report(1, {"activity": "idle", "boot": "a"}, now=101.0)
    assert [(c.rank, c.old, c.new) for c in changes] == [(1, "starting", "idle")]
    assert h.tick(102.0) == []
    assert [(c.rank, c.new) for c in h.tick(103.6)] == [(1, "unreachable")]
    h.report(0, {"activity": "idle"}, now=105.0)
    (lost,) = h.tick(106.0)
    assert (lost.rank, lost.new) == (1, "lost")
    assert "no report from rank 1 for 5.0 s" in lost.error and "restart" in lost.fix
    row = h.rows(106.0)[1]
    assert row["state"] == "lost" and row["heartbeat_age_s"] == 5.0 and row["fix"]
    # The same process again: back to what it says; the error stays as the last one.
    (back,) = h.report(1, {"activity": "executing", "boot": "a"}, now=107.0)
    assert (back.old, back.new) == ("lost", "executing")
    assert h.rows(107.0)[1]["error"].startswith("no report from rank 1")


def test_a_report_from_a_new_process_is_a_restart() -> None:
    h = Health(2, BEAT, TIMEOUT, now=0.0)
    h.report(1, {"activity": "idle", "boot": "a"}, now=1.0)
    first, *rest = h.report(1, {"activity": "starting", "boot": "b"}, now=2.0)
    assert first.new == "restarted" and [c.new for c in rest] == ["starting"]


def test_a_ranks_own_error_is_shown_with_its_fix() -> None:
    h = Health(2, BEAT, TIMEOUT, now=0.0)
    text = "the cluster is not ready after 5 s: rank(s) 1 have not joined"
    h.report(0, {"activity": "starting", "last_error": text}, now=1.0)
    row = h.rows(1.0)[0]
    assert row["error"] == text and "COMFY_CLUSTER_JOIN_TIMEOUT" in row["fix"]
    assert fix_for("") == "" and fix_for("something odd")


def test_health_refuses_a_timeout_shorter_than_two_beats() -> None:
    with pytest.raises(ValueError, match="at least 2 beats"):
        Health(2, 1.0, 1.5, now=0.0)


def test_rates_and_progress() -> None:
    rates = Rates()
    assert rates.sample({}, 0.0) is None  # a backend without counters
    assert rates.sample({"bytes_in": 100, "bytes_out": 0}, 1.0) == {"in": 0.0, "out": 0.0}
    assert rates.sample({"bytes_in": 2100, "bytes_out": 500}, 3.0) == {"in": 1000.0, "out": 250.0}
    assert rates.sample({"bytes_in": 5, "bytes_out": 5}, 4.0) == {
        "in": 0.0,
        "out": 0.0,
    }  # new world
    progress = Progress()
    progress.observe("execution_start", {"prompt_id": "p"})
    progress.observe("progress", {"prompt_id": "p", "node": "4", "value": 2, "max": 3})
    assert progress.snapshot() == {"prompt_id": "p", "node": "4", "value": 2, "max": 3}
    progress.observe("executing", {"node": None, "prompt_id": "p"})
    assert progress.snapshot() is None


class _Server:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.prompt_queue = None

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.sent.append((event, data))


class _Leader(Membership):
    """A leader in a formed world that records failures instead of re-forming."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "http://127.0.0.1:1")
        self.epoch, self.state = 3, "ready"
        self.failed: list[str] = []

    def fail(self, reason: str, **kwargs: Any) -> None:
        self.failed.append(reason)


def test_the_leader_files_reports_pushes_views_and_ends_a_world_without_a_follower() -> None:
    now = [0.0]
    settings = local_settings(0, 2, heartbeat_s=BEAT, heartbeat_timeout_s=TIMEOUT)
    server, leader = _Server(), _Leader(settings)
    panel = Panel(server, leader, clock=lambda: now[0])
    status = {"activity": "idle", "boot": "x", "epoch": 3, "membership": "ready", "url": "u1"}
    assert panel.heartbeat(Message(1, 3, "", {"status": status}))["ok"]
    with pytest.raises(Refused):
        panel.heartbeat(Message(1, 3, "", {"status": "not an object"}))
    panel.beat()
    event, view = server.sent[-1]
    assert event == STATUS_EVENT and [r["state"] for r in view["rows"]] == ["idle", "idle"]
    assert view["rows"][1]["url"] == "u1" and view["rows"][0]["url"] == "http://127.0.0.1:1"
    now[0] = TIMEOUT + 1
    panel.beat()
    lost = [d for e, d in server.sent if e == TRANSITION_EVENT and d["new"] == "lost"]
    assert [d["rank"] for d in lost] == [1]
    assert leader.failed and "no report from rank 1" in leader.failed[0]
    # Back in the current world after a restart: nothing more to re-form.
    panel.heartbeat(Message(1, 3, "", {"status": {**status, "boot": "y"}}))
    assert len(leader.failed) == 1


def test_the_messages_table_for_the_panels_messages() -> None:
    check_sender("heartbeat", 0, 2, 1)
    check_sender("command", 1, 2, 0)
    with pytest.raises(Refused, match="rank 1 is the follower: it does not take 'heartbeat'"):
        check_sender("heartbeat", 1, 2, 0)
    with pytest.raises(Refused, match="rank 0 is the leader: it does not take 'command'"):
        check_sender("command", 0, 2, 1)
    msg = Message.parse(1, "heartbeat", {"epoch": 2, "status": {"activity": "idle"}})
    assert msg.extra == {"status": {"activity": "idle"}}


def test_weights_fill_only_the_weights_a_workflow_left_empty() -> None:
    prompt = {
        "1": {"class_type": "ClusterFanOutLatent", "inputs": {"samples": ["3", 0]}},
        "2": {"class_type": "ClusterFanOutImage", "inputs": {"weights": "1,1"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {}},
    }
    out = with_weights(prompt, " 3,1 ")
    assert out["1"]["inputs"]["weights"] == "3,1"
    assert out["2"]["inputs"]["weights"] == "1,1" and "weights" not in out["3"]["inputs"]


def test_heartbeat_settings_from_the_environment() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "COMFY_CLUSTER_HEARTBEAT_S": "0.5",
           "COMFY_CLUSTER_HEARTBEAT_TIMEOUT_S": "3"}  # fmt: skip
    settings = Settings.from_env(env)
    assert settings is not None
    assert (settings.heartbeat_s, settings.heartbeat_timeout_s) == (0.5, 3.0)
    with pytest.raises(ConfigurationError, match="at least twice"):
        Settings.from_env({**env, "COMFY_CLUSTER_HEARTBEAT_TIMEOUT_S": "0.8"})


def test_ranks_started_together_beat_apart() -> None:
    # Phases rank/size into the period: the leader after a whole one, no follower later than it.
    assert [first_beat_s(r, 4, 2.0) for r in range(4)] == [2.0, 0.5, 1.0, 1.5]

    class _Stop:
        """Records each wait; stops the thread at the third."""

        def __init__(self) -> None:
            self.waits: list[float] = []

        def wait(self, timeout: float) -> bool:
            self.waits.append(timeout)
            return len(self.waits) == 3

        def set(self) -> None:
            pass

    settings = local_settings(3, 4, heartbeat_s=BEAT, heartbeat_timeout_s=TIMEOUT)
    panel = Panel(_Server(), _Leader(settings))
    beats: list[int] = []
    panel.beat = lambda: beats.append(1)  # type: ignore[method-assign]
    panel._stop = stop = _Stop()  # type: ignore[assignment]
    panel._run()
    assert stop.waits == [0.75 * BEAT, BEAT, BEAT] and len(beats) == 2
