"""The v1 HTTP API of a real server process: authentication, rank claims, limits, events."""

from __future__ import annotations

import base64
import uuid

import httpx

from .server_proc import ADMIN_KEY, ALPHA_KEY, BETA_KEY

A = {"X-Cluster-Key": ALPHA_KEY}
B = {"X-Cluster-Key": BETA_KEY}


def _iid() -> str:
    return "i-" + uuid.uuid4().hex[:12]


def _leave_all(http: httpx.Client, cluster: str, headers: dict[str, str]) -> None:
    for m in http.get(f"/v1/clusters/{cluster}/members", headers=headers).json()["members"]:
        http.delete(f"/v1/clusters/{cluster}/members/{m['instance_id']}", headers=headers)


def test_join_answers_a_token_handle_and_the_udp_port(http: httpx.Client, server) -> None:
    _leave_all(http, "alpha", A)
    iid = _iid()
    r = http.post(
        "/v1/clusters/alpha/join",
        json={
            "instance_id": iid,
            "rank": 2,
            "world_size": 4,
            "candidates": [{"host": "10.1.2.3", "port": 4000}],
            "role": "leader",
        },
        headers=A,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rank"] == 2 and body["world_size"] == 4
    assert len(base64.urlsafe_b64decode(body["token"])) == 16
    assert len(bytes.fromhex(body["handle"])) == 8
    assert body["udp"] == {"host": "127.0.0.1", "port": server.udp_port}
    assert body["ttl_s"] == 60.0 and body["heartbeat_interval_s"] == 20.0
    members = http.get("/v1/clusters/alpha/members", headers=A).json()
    assert members["generation"] >= body["generation"]
    (me,) = [m for m in members["members"] if m["instance_id"] == iid]
    assert me["candidates"] == [{"host": "10.1.2.3", "port": 4000, "kind": "local"}]
    assert me["role"] == "leader" and me["handle"] == body["handle"]
    hb = http.post(f"/v1/clusters/alpha/heartbeat/{iid}", headers=A)
    assert hb.status_code == 200 and hb.json()["generation"] == members["generation"]
    assert http.delete(f"/v1/clusters/alpha/members/{iid}", headers=A).status_code == 204
    assert http.post(f"/v1/clusters/alpha/heartbeat/{iid}", headers=A).status_code == 404


def test_unknown_cluster_and_wrong_key_get_the_same_answer(http: httpx.Client) -> None:
    answers = [
        http.get("/v1/clusters/alpha/members", headers={"X-Cluster-Key": "wrong-key-123456"}),
        http.get("/v1/clusters/alpha/members", headers=B),  # another cluster's key
        http.get("/v1/clusters/alpha/members"),  # no key at all
        http.get("/v1/clusters/nosuch/members", headers=A),
        http.post("/v1/clusters/nosuch/join", json={"instance_id": "x"}, headers=A),
        http.post("/v1/clusters/alpha/heartbeat/x", headers=B),
    ]
    assert {(r.status_code, r.text) for r in answers} == {
        (401, '{"detail":"unknown cluster or wrong cluster key"}')
    }


def test_a_claimed_rank_cannot_be_taken_over(http: httpx.Client) -> None:
    _leave_all(http, "beta", B)
    owner, thief = _iid(), _iid()
    assert (
        http.post(
            "/v1/clusters/beta/join", json={"instance_id": owner, "rank": 0}, headers=B
        ).status_code
        == 200
    )
    r = http.post("/v1/clusters/beta/join", json={"instance_id": thief, "rank": 0}, headers=B)
    assert r.status_code == 409 and "rank 0" in r.json()["detail"]
    # the owner itself may join again (a restarted process that kept its id)
    again = http.post("/v1/clusters/beta/join", json={"instance_id": owner, "rank": 0}, headers=B)
    assert again.status_code == 200
    # unassigned joins get the lowest free rank
    assert (
        http.post("/v1/clusters/beta/join", json={"instance_id": thief}, headers=B).json()["rank"]
        == 1
    )
    # once the owner leaves, the rank is free
    http.delete(f"/v1/clusters/beta/members/{owner}", headers=B)
    assert (
        http.post(
            "/v1/clusters/beta/join", json={"instance_id": _iid(), "rank": 0}, headers=B
        ).status_code
        == 200
    )
    _leave_all(http, "beta", B)


def test_world_size_mismatch_and_instance_limit(http: httpx.Client) -> None:
    _leave_all(http, "beta", B)
    assert (
        http.post(
            "/v1/clusters/beta/join", json={"instance_id": _iid(), "world_size": 8}, headers=B
        ).status_code
        == 200
    )
    r = http.post(
        "/v1/clusters/beta/join", json={"instance_id": _iid(), "world_size": 2}, headers=B
    )
    assert r.status_code == 409 and "world_size" in r.json()["detail"]
    for _ in range(3):  # the server allows 4 instances per cluster
        assert (
            http.post("/v1/clusters/beta/join", json={"instance_id": _iid()}, headers=B).status_code
            == 200
        )
    r = http.post("/v1/clusters/beta/join", json={"instance_id": _iid()}, headers=B)
    assert r.status_code == 409 and "COMFY_CLUSTER_STUN_MAX_INSTANCES" in r.json()["detail"]
    _leave_all(http, "beta", B)


def test_malformed_json_and_invalid_fields_are_422_without_echo(http: httpx.Client) -> None:
    r = http.post(
        "/v1/clusters/alpha/join",
        content=b'{"instance_id": ',
        headers={**A, "content-type": "application/json"},
    )
    assert r.status_code == 422
    r = http.post("/v1/clusters/alpha/join", json={"instance_id": "bad id with spaces"}, headers=A)
    assert r.status_code == 422
    r = http.post(
        "/v1/clusters/alpha/join",
        json={"instance_id": "x", "candidates": [{"host": "h", "port": 1}] * 9},
        headers=A,
    )
    assert r.status_code == 422
    r = http.post(
        "/register-instance",
        json={
            "cluster_id": "alpha",
            "cluster_key": "secret-in-body-1234",
            "role": "boss",
            "address": "1.2.3.4",
            "direct_listen_port": 1,
            "instance_id": 0,
        },
    )
    assert r.status_code == 422 and "secret-in-body-1234" not in r.text


def test_oversized_bodies_are_413_declared_or_chunked(http: httpx.Client) -> None:
    big = b'{"instance_id": "x", "pad": "' + b"x" * 20_000 + b'"}'
    r = http.post(
        "/v1/clusters/alpha/join", content=big, headers={**A, "content-type": "application/json"}
    )
    assert r.status_code == 413

    def chunks():
        yield big[:10_000]
        yield big[10_000:]

    r = http.post(
        "/v1/clusters/alpha/join",
        content=chunks(),
        headers={**A, "content-type": "application/json"},
    )
    assert r.status_code == 413
    assert http.get("/health").status_code == 200


def test_enumeration_needs_the_admin_key(http: httpx.Client) -> None:
    assert http.get("/v1/clusters").status_code == 401
    assert http.get("/v1/clusters", headers={"X-Admin-Key": ALPHA_KEY}).status_code == 401
    assert http.get("/clusters").status_code == 404  # the original's open listing is not served
    r = http.get("/v1/clusters", headers={"X-Admin-Key": ADMIN_KEY})
    assert r.status_code == 200
    assert {c["cluster_id"] for c in r.json()["clusters"]} == {"alpha", "beta"}
    stats = http.get("/v1/stats", headers={"X-Admin-Key": ADMIN_KEY}).json()
    assert "relay_forwarded" in stats["udp"]
    assert "clusters" not in http.get("/health").text


def test_events_mailbox(http: httpx.Client) -> None:
    iid = _iid()
    http.post("/v1/clusters/alpha/join", json={"instance_id": iid}, headers=A)
    r = http.post(
        "/v1/clusters/alpha/events",
        json={"from_instance": iid, "kind": "hello", "body": {"n": 1}},
        headers=A,
    )
    assert r.status_code == 200
    seq = r.json()["seq"]
    got = http.get("/v1/clusters/alpha/events", params={"after": seq - 1}, headers=A).json()[
        "events"
    ]
    assert [(e["kind"], e["body"], e["from_instance"]) for e in got] == [("hello", {"n": 1}, iid)]
    assert http.get("/v1/clusters/alpha/events", params={"after": seq}, headers=A).json() == {
        "events": []
    }
    big = http.post(
        "/v1/clusters/alpha/events",
        json={"from_instance": iid, "kind": "k", "body": "x" * 5000},
        headers=A,
    )
    assert big.status_code == 413
    stranger = http.post(
        "/v1/clusters/alpha/events", json={"from_instance": "nobody", "kind": "k"}, headers=A
    )
    assert stranger.status_code == 404
    http.delete(f"/v1/clusters/alpha/members/{iid}", headers=A)
