"""The app in process (Starlette's TestClient, an httpx client) with an injected clock: expiry,
open registration, long polls."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator

import pytest

with warnings.catch_warnings():
    # Starlette suggests another httpx package for its TestClient; this one works as it is
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from collectives.errors import ConfigurationError
from stun import Settings, create_app

KEY = "alpha-key-0123456789abcdef"
H = {"X-Cluster-Key": KEY}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _client(clock: FakeClock, **settings: object) -> TestClient:
    base: dict[str, object] = {"cluster_keys": {"alpha": KEY}, "udp_port": None, "ttl_s": 60.0}
    base.update(settings)
    return TestClient(create_app(Settings(**base), clock=clock), base_url="http://stun.test")  # type: ignore[arg-type]


@pytest.fixture
def client(clock: FakeClock) -> Iterator[TestClient]:
    with _client(clock) as c:
        yield c


def test_members_expire_after_the_ttl(client: TestClient, clock: FakeClock) -> None:
    client.post("/v1/clusters/alpha/join", json={"instance_id": "a", "rank": 0}, headers=H)
    client.post("/v1/clusters/alpha/join", json={"instance_id": "b", "rank": 1}, headers=H)
    clock.now += 50
    assert client.post("/v1/clusters/alpha/heartbeat/a", headers=H).status_code == 200
    clock.now += 15  # b: 65 s since its join; a: 15 s since its heartbeat
    ids = [
        m["instance_id"]
        for m in client.get("/v1/clusters/alpha/members", headers=H).json()["members"]
    ]
    assert ids == ["a"]
    assert client.post("/v1/clusters/alpha/heartbeat/b", headers=H).status_code == 404
    # b's rank is free again, for anyone
    r = client.post("/v1/clusters/alpha/join", json={"instance_id": "c", "rank": 1}, headers=H)
    assert r.status_code == 200
    clock.now += 61
    assert client.get("/v1/clusters/alpha/members", headers=H).json()["members"] == []


def test_an_expired_rank_can_be_claimed_by_another(client: TestClient, clock: FakeClock) -> None:
    client.post("/v1/clusters/alpha/join", json={"instance_id": "old", "rank": 0}, headers=H)
    assert (
        client.post(
            "/v1/clusters/alpha/join", json={"instance_id": "new", "rank": 0}, headers=H
        ).status_code
        == 409
    )
    clock.now += 61
    assert (
        client.post(
            "/v1/clusters/alpha/join", json={"instance_id": "new", "rank": 0}, headers=H
        ).status_code
        == 200
    )


def test_open_registration_off_refuses_unknown_clusters(client: TestClient) -> None:
    r = client.post(
        "/v1/clusters/newone/join", json={"instance_id": "a"}, headers={"X-Cluster-Key": "k" * 32}
    )
    assert r.status_code == 401


def test_open_registration_on_creates_a_cluster_by_its_first_join(clock: FakeClock) -> None:
    with _client(clock, open_registration=True, max_clusters=2) as c:
        key = {"X-Cluster-Key": "n" * 32}
        r = c.post("/v1/clusters/newone/join", json={"instance_id": "a"}, headers=key)
        assert r.status_code == 200
        # the first key now owns it: another key is refused like any wrong key
        other = c.post(
            "/v1/clusters/newone/join",
            json={"instance_id": "b"},
            headers={"X-Cluster-Key": "m" * 32},
        )
        assert other.status_code == 401
        short = c.post(
            "/v1/clusters/another/join",
            json={"instance_id": "a"},
            headers={"X-Cluster-Key": "short"},
        )
        assert short.status_code == 400 and "16" in short.json()["detail"]
        # the server's cluster limit (alpha + newone)
        full = c.post(
            "/v1/clusters/third/join",
            json={"instance_id": "a"},
            headers={"X-Cluster-Key": "t" * 32},
        )
        assert full.status_code == 409 and "MAX_CLUSTERS" in full.json()["detail"]
        # a registration-created cluster is forgotten with its last member
        clock.now += 61
        c.get("/v1/clusters/alpha/members", headers=H)
        retake = c.post(
            "/v1/clusters/newone/join",
            json={"instance_id": "z"},
            headers={"X-Cluster-Key": "m" * 32},
        )
        assert retake.status_code == 200


def test_no_cluster_at_all_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_AUTH_KEYS"):
        Settings(cluster_keys={})


def test_long_poll_returns_at_the_next_change(client: TestClient) -> None:
    gen = client.post("/v1/clusters/alpha/join", json={"instance_id": "a"}, headers=H).json()[
        "generation"
    ]
    got: dict[str, object] = {}

    def poll() -> None:
        t0 = time.monotonic()
        r = client.get(
            "/v1/clusters/alpha/members",
            params={"after_generation": gen, "timeout_s": 10},
            headers=H,
        )
        got["elapsed"] = time.monotonic() - t0
        got["body"] = r.json()

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)
    client.post("/v1/clusters/alpha/join", json={"instance_id": "b"}, headers=H)
    t.join(10)
    body = got["body"]
    assert isinstance(body, dict) and body["generation"] > gen
    assert [m["instance_id"] for m in body["members"]] == ["a", "b"]
    assert 0.2 < float(got["elapsed"]) < 5  # type: ignore[arg-type]


def test_long_poll_times_out_with_the_same_generation(client: TestClient) -> None:
    gen = client.post("/v1/clusters/alpha/join", json={"instance_id": "a"}, headers=H).json()[
        "generation"
    ]
    t0 = time.monotonic()
    r = client.get(
        "/v1/clusters/alpha/members", params={"after_generation": gen, "timeout_s": 0.3}, headers=H
    )
    assert r.json()["generation"] == gen and 0.25 < time.monotonic() - t0 < 3


def test_heartbeat_candidates_bump_the_generation(client: TestClient) -> None:
    gen = client.post("/v1/clusters/alpha/join", json={"instance_id": "a"}, headers=H).json()[
        "generation"
    ]
    same = client.post("/v1/clusters/alpha/heartbeat/a", headers=H).json()["generation"]
    assert same == gen
    moved = client.post(
        "/v1/clusters/alpha/heartbeat/a",
        json={"candidates": [{"host": "10.9.9.9", "port": 7}]},
        headers=H,
    )
    assert moved.json()["generation"] > gen


def test_the_only_member_joining_again_keeps_the_clusters_world_size(client: TestClient) -> None:
    join = "/v1/clusters/alpha/join"
    first = client.post(join, json={"instance_id": "a", "rank": 0, "world_size": 3}, headers=H)
    assert first.json()["world_size"] == 3
    # the same instance again (a restarted process that kept its id), without a size
    again = client.post(join, json={"instance_id": "a", "rank": 0}, headers=H)
    assert again.status_code == 200 and again.json()["world_size"] == 3
    other = client.post(join, json={"instance_id": "b", "rank": None}, headers=H)
    assert other.json()["world_size"] == 3 and other.json()["rank"] == 1
