"""A formed ``stun`` world keeps working while its rendezvous server (a real ``python -m stun``
process) is killed and started again on the same ports.

Soft state: each instance's next heartbeat gets 404, it joins again under the same instance id
and rank within one heartbeat interval, binds with its new token, and the relay forwards again
(relayed peers resume; direct peers never stopped).  With the server's SQLite store the members
come back with the server: nobody needs to join again.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collectives.auth import ClusterKey
from collectives.communicator import Communicator
from collectives.rendezvous.stun_client import Members, StunClient
from tests.backends.stun_helpers import KEY, stun_env
from tests.backends.udp_worlds import run_world
from tests.stun.server_proc import StunProcess

HEARTBEAT_S = 1.0
OUTAGE_S = 1.5


class Loop:
    """Collectives in a loop on every rank, stopped by all ranks at the same iteration."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = 0  # iterations completed by rank 0

    def body(self, comm: Communicator) -> dict[str, Any]:
        iterations = 0
        while True:
            flags = comm.allreduce(np.array([comm.rank + 1, int(self.stop.is_set())]))
            assert int(flags[0]) == sum(range(1, comm.size + 1))
            data = np.full(64 << 10, iterations % 256, dtype=np.uint8) if comm.rank == 0 else None
            got = comm.broadcast(data, root=0)
            assert int(got[-1]) == iterations % 256
            iterations += 1
            if comm.rank == 0:
                with self.lock:
                    self.done = iterations
            if flags[1]:
                break
        return {"iterations": iterations, "stats": comm.stats()}

    def wait_done(self, at_least: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.done < at_least:
            assert time.monotonic() < end, f"collectives stalled at {self.done} < {at_least}"
            time.sleep(0.02)


def _bound(members: Members) -> dict[int, str]:
    """rank -> instance id of the members whose STUN binding the server has seen."""
    return {m.rank: m.instance_id for m in members.members
            if any(c.kind == "reflexive" for c in m.candidates)}  # fmt: skip


@pytest.mark.parametrize(
    ("direct", "persist"),
    [("0", False), ("1", False), ("0", True)],
    ids=["relayed-soft-state", "direct-soft-state", "relayed-sqlite"],
)
def test_world_survives_a_server_restart(direct: str, persist: bool, tmp_path: Path) -> None:
    env = {"COMFY_CLUSTER_AUTH_KEYS": f"restart:{KEY}", "COMFY_CLUSTER_STUN_TTL_S": "30",
           "COMFY_CLUSTER_STUN_HEARTBEAT_S": str(HEARTBEAT_S)}  # fmt: skip
    if persist:
        env["COMFY_CLUSTER_STUN_DB"] = str(tmp_path / "stun.sqlite")
    server = StunProcess(env).start()
    loop = Loop()
    outcome: dict[str, Any] = {}
    watcher = StunClient(server.url, "restart", ClusterKey(KEY), environ={}, timeout=2.0)

    def operate() -> None:
        try:
            loop.wait_done(5, 20.0)
            before = _bound(watcher.members())
            server.kill()
            killed_at = loop.done
            time.sleep(OUTAGE_S)
            outcome["during_outage"] = loop.done - killed_at
            server.start()
            up = time.monotonic()
            while (after := _bound(watcher.members())) != before:
                assert time.monotonic() - up < 10, (before, after)
                time.sleep(0.02)
            outcome["rebound_s"] = time.monotonic() - up
            outcome["before"], outcome["after"] = before, after
            resumed = loop.done
            loop.wait_done(resumed + 10, 20.0)  # collectives run on after the restart
        except BaseException as err:
            outcome["error"] = err
        finally:
            loop.stop.set()

    operator = threading.Thread(target=operate, daemon=True)
    try:
        operator.start()
        results = run_world(
            2, stun_env(server.url, "restart", COMFY_CLUSTER_NAT_DIRECT=direct), loop.body,
            timeout=60.0,
        )  # fmt: skip
        operator.join(30)
    finally:
        watcher.close()
        server.stop()
    if "error" in outcome:
        raise outcome["error"]
    print("restart", direct, persist, {k: v for k, v in outcome.items() if k != "error"})
    # The same instance ids hold the same ranks, bound again within one heartbeat interval
    # (plus the time a join and a STUN binding take).
    assert outcome["after"] == outcome["before"] and sorted(outcome["after"]) == [0, 1]
    assert outcome["rebound_s"] < HEARTBEAT_S + 1.0, outcome
    for result in results:
        stats = result["stats"]
        assert result["iterations"] >= 15
        expect = "relayed" if direct == "0" else "direct"
        assert all(p["path"] == expect for p in stats["paths"].values()), stats["paths"]
        # Soft state: one rejoin each; the SQLite store kept the records (and tokens).
        assert stats["rejoins"] == (0 if persist else 1), stats
    if direct == "1":
        assert outcome["during_outage"] > 0  # direct peers never needed the server
