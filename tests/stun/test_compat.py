"""An instance of the original ComfyUI_Cluster registers here unchanged: its client's exact
requests (key in the registration body, X-Cluster-Key elsewhere, integer instance ids, lower
case roles) and the fields it reads back."""

from __future__ import annotations

import httpx

from .server_proc import ALPHA_KEY

# what the original STUNRegistrationStrategy sends, field for field
ORIGINAL_REGISTRATION = {
    "address": "203.0.113.1",
    "direct_listen_port": 9998,
    "role": "leader",
    "instance_id": 0,
    "cluster_id": "alpha",
    "cluster_key": ALPHA_KEY,
}


def test_the_original_clients_requests(http: httpx.Client) -> None:
    r = http.post("/register-instance", json=ORIGINAL_REGISTRATION)  # no header
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "registered" and r.json()["instance_id"] == 0
    follower = {
        **ORIGINAL_REGISTRATION,
        "instance_id": 1,
        "role": "FOLLOWER",
        "address": "203.0.113.2",
    }
    assert http.post("/register-instance", json=follower).status_code == 200

    listed = http.get("/instances/alpha", headers={"X-Cluster-Key": ALPHA_KEY})
    assert listed.status_code == 200
    instances = {i["instance_id"]: i for i in listed.json()["instances"]}
    # the original client reads exactly these four fields of each instance
    assert {
        k: instances[0][k] for k in ("instance_id", "address", "direct_listen_port", "role")
    } == {"instance_id": 0, "address": "203.0.113.1", "direct_listen_port": 9998, "role": "leader"}
    assert instances[1]["role"] == "follower" and instances[1]["address"] == "203.0.113.2"

    hb = http.post("/heartbeat/alpha/1", headers={"X-Cluster-Key": ALPHA_KEY})
    assert hb.status_code == 200 and hb.json()["status"] == "ok"
    assert http.delete("/instance/alpha/1", headers={"X-Cluster-Key": ALPHA_KEY}).status_code == 200
    assert http.post("/heartbeat/alpha/1", headers={"X-Cluster-Key": ALPHA_KEY}).status_code == 404
    assert http.delete("/instance/alpha/1", headers={"X-Cluster-Key": ALPHA_KEY}).status_code == 404
    # an original instance is a v1 member too: same rank table, same rank-claim rule
    members = http.get("/v1/clusters/alpha/members", headers={"X-Cluster-Key": ALPHA_KEY}).json()
    assert [(m["instance_id"], m["rank"]) for m in members["members"]] == [("0", 0)]
    taken = http.post(
        "/v1/clusters/alpha/join",
        json={"instance_id": "other", "rank": 0},
        headers={"X-Cluster-Key": ALPHA_KEY},
    )
    assert taken.status_code == 409
    http.delete("/instance/alpha/0", headers={"X-Cluster-Key": ALPHA_KEY})


def test_the_original_routes_refuse_a_wrong_key_the_same_way(http: httpx.Client) -> None:
    wrong = {**ORIGINAL_REGISTRATION, "cluster_key": "not-the-key-000"}
    unknown = {**ORIGINAL_REGISTRATION, "cluster_id": "gamma"}
    answers = [
        http.post("/register-instance", json=wrong),
        http.post("/register-instance", json=unknown),
        http.get("/instances/alpha", headers={"X-Cluster-Key": "not-the-key-000"}),
        http.get("/instances/gamma", headers={"X-Cluster-Key": ALPHA_KEY}),
        http.post("/heartbeat/alpha/0"),
    ]
    assert {(r.status_code, r.text) for r in answers} == {
        (401, '{"detail":"unknown cluster or wrong cluster key"}')
    }
