"""ClusterInfo's text: each peer's path and the doctor's problems, bounded in time."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from collectives import Communicator
from comfy_nodes import cluster_info
from comfy_nodes.cluster import ClusterStatus
from comfy_nodes.cluster_info import doctor_problems, info_text, path_text

from .helpers import run_node, spmd

MODE = "COMFY_CLUSTER_REGISTRATION_MODE"


def test_the_node_shows_the_doctors_problems_with_their_fixes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MODE, "carrier-pigeon")

    def rank(comm: Communicator) -> Any:
        out = run_node("ClusterInfo")
        comm.barrier()
        return out

    for r, out in enumerate(spmd(2, rank)):
        text = out["result"][0]
        assert f"rank {r} of 2" in text and "connected: 2/2" in text
        assert f"  rank {1 - r}: ok" in text  # the local backend routes nothing: no path
        assert "doctor: " in text and "problem(s)" in text
        problem = next(line for line in text.splitlines() if "PROBLEM  discovery" in line)
        assert "'carrier-pigeon' is unknown" in problem
        assert f"-> fix: set {MODE} to one of" in problem
        assert not any(line.lstrip().startswith("ok ") for line in text.splitlines())


def test_no_doctor_where_it_has_nothing_to_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODE, raising=False)
    text = run_node("ClusterInfo")["result"][0]
    assert "backend local" in text and "doctor" not in text
    assert doctor_problems("local", {}) == []


class _Paths:
    """The one thing info_text asks a communicator beyond its status: its paths."""

    def __init__(self, paths: dict[int, dict[str, Any]]) -> None:
        self._paths = paths

    def paths(self) -> dict[int, dict[str, Any]]:
        return self._paths


def test_each_peers_path_is_shown() -> None:
    status = ClusterStatus(0, 4, "local", {1: "ok", 2: "ok", 3: "lost"})
    comm: Any = _Paths(
        {
            1: {"path": "direct", "address": ("10.0.0.2", 40000)},
            2: {"path": "relayed", "address": ["198.51.100.1", 3478], "switches": 1},
            3: {"path": "punched", "address": None},
        }
    )
    lines = info_text(status, comm, environ={}).splitlines()
    assert "  rank 1: ok, path direct 10.0.0.2:40000" in lines
    assert "  rank 2: ok, path relayed via 198.51.100.1:3478" in lines
    assert "  rank 3: lost, path punched" in lines
    assert path_text(None) is None and path_text({"path": 3}) is None


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An HTTP port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_doctor_that_cannot_finish_is_cut_short(silent_server: str) -> None:
    env = {
        MODE: "stun",
        "COMFY_CLUSTER_STUN_SERVER": silent_server,
        "COMFY_CLUSTER_CLUSTER_ID": "alpha",
        "COMFY_CLUSTER_KEY": "k" * 32,
    }
    started = time.monotonic()
    lines = doctor_problems("udp", env, timeout=0.2)
    took = time.monotonic() - started
    assert took < 0.2 + cluster_info.DOCTOR_PROBE_S / 2
    assert len(lines) == 1 and "did not finish within 0.2 s" in lines[0]
    assert "comfycluster doctor" in lines[0]
    # Given the time, the same doctor says what is wrong: the server does not answer.
    lines = doctor_problems("udp", env, timeout=10.0)
    assert any(line.startswith("PROBLEM  server:") and "-> fix:" in line for line in lines)
