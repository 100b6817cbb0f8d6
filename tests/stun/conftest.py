"""Fixtures: one real server process shared by a module's tests (each test uses its own ids)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from .server_proc import StunProcess


@pytest.fixture(scope="module")
def server() -> Iterator[StunProcess]:
    proc = StunProcess({"COMFY_CLUSTER_STUN_MAX_INSTANCES": "4"}).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def http(server: StunProcess) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client
