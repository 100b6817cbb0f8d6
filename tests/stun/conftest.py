"""Fixtures: one real server process shared by a module's tests (each test uses its own ids)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from .server_proc import KEYS, Rank, StunProcess, serving


@pytest.fixture(scope="module")
def server() -> Iterator[StunProcess]:
    with serving({"COMFY_CLUSTER_STUN_MAX_INSTANCES": "4"}) as proc:
        yield proc


@pytest.fixture
def http(server: StunProcess) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def ranks(http: httpx.Client) -> Iterator[list[Rank]]:
    """Ranks a test registers; their sockets closed and memberships left afterwards."""
    made: list[Rank] = []
    yield made
    for r in made:
        r.sock.close()
        http.delete(
            f"/v1/clusters/{r.cluster}/members/{r.instance_id}",
            headers={"X-Cluster-Key": KEYS[r.cluster]},
        )
