"""Real server processes killed and started again: soft state heals within one heartbeat, the
SQLite store keeps it outright; a short TTL expires members of a real process; rate limits."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from .server_proc import ALPHA_KEY, StunProcess

H = {"X-Cluster-Key": ALPHA_KEY}


def _join(c: httpx.Client, iid: str, rank: int) -> dict[str, object]:
    r = c.post(
        "/v1/clusters/alpha/join",
        json={"instance_id": iid, "rank": rank, "world_size": 3},
        headers=H,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def _heartbeat_or_rejoin(c: httpx.Client, iid: str, rank: int) -> int:
    """What a client does each heartbeat interval: 404 means join again."""
    r = c.post(f"/v1/clusters/alpha/heartbeat/{iid}", headers=H)
    if r.status_code == 404:
        _join(c, iid, rank)
    else:
        assert r.status_code == 200, r.text
    return r.status_code


def test_a_restart_heals_within_one_heartbeat() -> None:
    server = StunProcess(udp=False).start()
    try:
        with server.client() as c:
            before = {f"r{i}": _join(c, f"r{i}", i) for i in range(3)}
            server.kill()
            server.start()
            assert c.get("/v1/clusters/alpha/members", headers=H).json()["members"] == []
            # one heartbeat round: every member learns it is unknown and joins again
            codes = [_heartbeat_or_rejoin(c, f"r{i}", i) for i in range(3)]
            assert codes == [404, 404, 404]
            after = c.get("/v1/clusters/alpha/members", headers=H).json()
            assert [(m["instance_id"], m["rank"]) for m in after["members"]] == [
                ("r0", 0),
                ("r1", 1),
                ("r2", 2),
            ]
            assert after["world_size"] == 3
            # handles are derived, so peers keep them; generations keep increasing
            assert [m["handle"] for m in after["members"]] == [
                before[f"r{i}"]["handle"] for i in range(3)
            ]
            assert after["generation"] > int(before["r2"]["generation"])  # type: ignore[call-overload]
            assert [_heartbeat_or_rejoin(c, f"r{i}", i) for i in range(3)] == [200, 200, 200]
    finally:
        server.stop()


def test_with_sqlite_the_state_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "stun.db"
    server = StunProcess({"COMFY_CLUSTER_STUN_DB": str(db)}, udp=False).start()
    try:
        with server.client() as c:
            joined = _join(c, "keeper", 1)
            server.kill()
            server.start()
            assert c.post("/v1/clusters/alpha/heartbeat/keeper", headers=H).status_code == 200
            members = c.get("/v1/clusters/alpha/members", headers=H).json()
            assert [(m["instance_id"], m["rank"]) for m in members["members"]] == [("keeper", 1)]
            # the rank claim survived too, and the same token is still this member's
            assert (
                c.post(
                    "/v1/clusters/alpha/join", json={"instance_id": "thief", "rank": 1}, headers=H
                ).status_code
                == 409
            )
            assert members["members"][0]["handle"] == joined["handle"]
        assert db.stat().st_mode & 0o077 == 0  # it holds tokens: owner-only
    finally:
        server.stop()


def test_a_short_ttl_expires_members_of_a_real_process() -> None:
    server = StunProcess(
        {"COMFY_CLUSTER_STUN_TTL_S": "0.6", "COMFY_CLUSTER_STUN_CLEANUP_INTERVAL_S": "0.1"},
        udp=False,
    ).start()
    try:
        with server.client() as c:
            _join(c, "brief", 0)
            stay = _join(c, "stays", 1)
            assert stay["ttl_s"] == 0.6 and stay["heartbeat_interval_s"] == pytest.approx(0.2)
            deadline = time.monotonic() + 1.2
            while time.monotonic() < deadline:
                assert c.post("/v1/clusters/alpha/heartbeat/stays", headers=H).status_code == 200
                time.sleep(0.1)
            ids = [
                m["instance_id"]
                for m in c.get("/v1/clusters/alpha/members", headers=H).json()["members"]
            ]
            assert ids == ["stays"]
            assert c.post("/v1/clusters/alpha/heartbeat/brief", headers=H).status_code == 404
    finally:
        server.stop()


def test_rate_limits_answer_429_with_retry_after() -> None:
    server = StunProcess({"COMFY_CLUSTER_STUN_RATE_PER_IP": "5"}, udp=False).start()
    try:
        with server.client() as c:
            codes = [c.get("/health").status_code for _ in range(30)]
            assert codes[:5] == [200] * 5  # the burst (twice the rate, less the start-up probes)
            assert 429 in codes
            r = c.get("/health")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    finally:
        server.stop()


def test_the_per_cluster_rate_limit() -> None:
    server = StunProcess({"COMFY_CLUSTER_STUN_RATE_PER_CLUSTER": "5"}, udp=False).start()
    try:
        with server.client() as c:
            codes = [c.get("/v1/clusters/alpha/members", headers=H).status_code for _ in range(20)]
            assert codes[:10] == [200] * 10 and codes[-1] == 429
            # another cluster's budget is its own; a wrong key never spends one
            assert (
                c.get("/v1/clusters/beta/members", headers={"X-Cluster-Key": "x" * 20}).status_code
                == 401
            )
    finally:
        server.stop()
