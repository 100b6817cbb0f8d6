"""Ranks in ``stun`` discovery against the real rendezvous server (``python -m stun`` on
127.0.0.1): instances started without ``RANK`` get their rank (and the world size) from the
server; a rank that closes is deleted from the server at once; a crashed rank's record expires
after the TTL and a new instance claims its rank; :meth:`Communicator.paths` shows each peer's
path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from collectives.auth import ClusterKey
from collectives.backends.base import BackendConfig
from collectives.backends.udp_rendezvous import claim_unranked
from collectives.communicator import Communicator
from collectives.errors import ConfigurationError
from collectives.rendezvous.stun_client import StunClient, StunConflictError
from collectives.world import init
from tests.backends.stun_helpers import KEY, stun_env
from tests.backends.udp_worlds import run_world
from tests.stun.server_proc import REPO, StunProcess

CLUSTERS = ("sized", "fromserver", "nosize", "leave", "crash", "paths", "late")
TTL_S = 2.0


@pytest.fixture(scope="module")
def server() -> Iterator[StunProcess]:
    proc = StunProcess({
        "COMFY_CLUSTER_AUTH_KEYS": ",".join(f"{c}:{KEY}" for c in CLUSTERS),
        "COMFY_CLUSTER_STUN_TTL_S": str(TTL_S),
        "COMFY_CLUSTER_STUN_CLEANUP_INTERVAL_S": "0.2",
    }).start()  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


def client(server: StunProcess, cluster: str) -> StunClient:
    return StunClient(server.url, cluster, ClusterKey(KEY), environ={})


def _exercise(comm: Communicator) -> dict[str, Any]:
    total = comm.allreduce(np.full(4096, comm.rank + 1, dtype=np.int64))
    assert int(total[0]) == sum(range(1, comm.size + 1))
    assert comm.allgather(comm.rank) == list(range(comm.size))
    return {"rank": comm.rank, "size": comm.size, "paths": comm.paths()}


# -- ranks from the server ---------------------------------------------------------------------
def test_ranks_assigned_by_the_server_with_the_size_given(server: StunProcess) -> None:
    env = stun_env(server.url, "sized")

    def body(comm: Communicator) -> dict[str, Any]:
        out = _exercise(comm)
        out["instance"] = comm.engine._rendezvous.instance_id  # type: ignore[attr-defined]
        return out

    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def main() -> None:
        try:
            comm = init(size=3, environ=env, timeout=20.0)  # no rank: the server picks it
            try:
                results[comm.rank] = body(comm)
            finally:
                comm.close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=main, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2]
    assert all(r["size"] == 3 for r in results.values())
    instances = {r["instance"] for r in results.values()}
    assert len(instances) == 3 and all(i.startswith("inst-") for i in instances)


def test_world_size_from_the_server(server: StunProcess) -> None:
    """The first instance says the size; the second knows neither its rank nor the size."""
    env = stun_env(server.url, "fromserver")
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def main(size: int | None) -> None:
        try:
            comm = init(size=size, environ=env, timeout=20.0)
            try:
                results[comm.rank] = _exercise(comm)
            finally:
                comm.close()
        except BaseException as err:
            errors.append(err)

    first = threading.Thread(target=main, args=(2,), daemon=True)
    first.start()
    watcher = client(server, "fromserver")
    try:
        end = time.monotonic() + 10
        while watcher.members().world_size is None:
            assert time.monotonic() < end, "the first instance never joined"
            time.sleep(0.05)
    finally:
        watcher.close()
    second = threading.Thread(target=main, args=(None,), daemon=True)
    second.start()
    for t in (first, second):
        t.join(50)
    assert not errors, errors
    assert sorted(results) == [0, 1] and all(r["size"] == 2 for r in results.values())


def test_no_world_size_anywhere_names_the_variables(server: StunProcess) -> None:
    env = stun_env(server.url, "nosize", COMFY_CLUSTER_INSTANCE_ID="lost-one")
    with pytest.raises(ConfigurationError, match=r"WORLD_SIZE.*COMFY_CLUSTER_STUN_WORLD_SIZE"):
        init(environ=env, timeout=5.0)
    watcher = client(server, "nosize")
    try:
        assert watcher.members().members == ()  # the claim was deleted, not left to expire
    finally:
        watcher.close()


def test_unranked_join_keeps_the_rank_of_its_instance_id(server: StunProcess) -> None:
    """An instance id the server holds (a launcher's claim) keeps its rank."""
    holder = client(server, "sized")
    try:
        holder.join("claimed-by-launcher", rank=1, world_size=2, candidates=[])
        env = stun_env(server.url, "sized", COMFY_CLUSTER_INSTANCE_ID="claimed-by-launcher")
        config, environ = claim_unranked(BackendConfig(environ=env), env)
        assert (config.rank, config.size) == (1, 2)
        assert environ["COMFY_CLUSTER_INSTANCE_ID"] == "claimed-by-launcher"
        # Not stun discovery, or RANK known: nothing asked of the server.
        plain = {k: v for k, v in env.items() if k != "COMFY_CLUSTER_REGISTRATION_MODE"}
        assert claim_unranked(BackendConfig(environ=plain), plain)[0].rank is None
        ranked = dict(env, RANK="0", WORLD_SIZE="2")
        assert claim_unranked(BackendConfig(environ=ranked), ranked)[0].rank is None
    finally:
        holder.leave("claimed-by-launcher")
        holder.close()


# -- leaving and crashing ----------------------------------------------------------------------
def test_a_rank_that_closes_is_deleted_at_once(server: StunProcess) -> None:
    env = stun_env(server.url, "leave")
    watcher = client(server, "leave")
    seen: dict[str, Any] = {}

    def body(comm: Communicator) -> None:
        _exercise(comm)
        comm.barrier()
        if comm.rank == 1:
            return  # run_world closes it: a DELETE
        end = time.monotonic() + TTL_S / 2  # well inside the TTL: not an expiry
        while time.monotonic() < end:
            members = watcher.members().by_rank()
            if 1 not in members:
                seen["gone_after_close"] = True
                seen["still_there"] = sorted(members)
                return
            time.sleep(0.02)

    try:
        run_world(2, env, body)
        assert seen.get("gone_after_close"), seen
        assert seen["still_there"] == [0]
        assert watcher.members().members == ()  # rank 0 left too
    finally:
        watcher.close()


_CRASHER = """
import os, sys, time
from collectives.world import init
comm = init("udp", timeout=20.0)
comm.barrier()
print("READY", comm.engine._rendezvous.instance_id, flush=True)
time.sleep(600)
"""


def test_a_crashed_rank_expires_and_a_new_instance_claims_its_rank(server: StunProcess) -> None:
    env = stun_env(server.url, "crash")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("COMFY_")}
    child_env.update(env, RANK="1", WORLD_SIZE="2", PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", _CRASHER], env=child_env, cwd=REPO,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    watcher = client(server, "crash")
    try:
        comm = init("udp", rank=0, size=2, environ=env, timeout=20.0)
        try:
            comm.barrier()
            assert child.stdout is not None
            line = child.stdout.readline().split()
            assert line[:1] == ["READY"], line
            crashed = line[1]
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            killed = time.monotonic()
            # Until the TTL the record holds the rank against anyone else.
            assert watcher.members().by_rank()[1].instance_id == crashed
            with pytest.raises(StunConflictError):
                watcher.join("impostor", rank=1, world_size=2, candidates=[])
            end = killed + TTL_S + 3.0
            while 1 in watcher.members().by_rank():
                assert time.monotonic() < end, "the crashed rank's record never expired"
                time.sleep(0.05)
            expired_after = time.monotonic() - killed
            assert expired_after >= TTL_S - 1.0, expired_after  # expired, not deleted
            assert 0 in watcher.members().by_rank()  # rank 0 heartbeats
            # A restarted follower (a new instance id, no RANK) gets rank 1 back.
            config, environ = claim_unranked(BackendConfig(environ=env), env)
            assert (config.rank, config.size) == (1, 2)
            assert environ["COMFY_CLUSTER_INSTANCE_ID"] != crashed
            assert (
                watcher.members().by_rank()[1].instance_id == environ["COMFY_CLUSTER_INSTANCE_ID"]
            )
            watcher.leave(environ["COMFY_CLUSTER_INSTANCE_ID"])
        finally:
            comm.abort("the test is over")
            comm.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        watcher.close()


# -- paths -------------------------------------------------------------------------------------
def test_paths_show_each_peers_path(server: StunProcess) -> None:
    env = stun_env(server.url, "paths", COMFY_CLUSTER_NAT_DIRECT="0")
    out = run_world(2, env, _exercise)
    for rank, result in enumerate(out):
        paths = result["paths"]
        assert list(paths) == [1 - rank]
        info = paths[1 - rank]
        assert info["path"] == "relayed"
        assert tuple(info["address"]) == ("127.0.0.1", server.udp_port)
    local = init("local", environ={})
    try:
        assert local.paths() == {}
    finally:
        local.close()


def test_a_rank_waiting_longer_than_the_ttl_for_a_late_peer_stays_listed(
    server: StunProcess,
) -> None:
    # Rank 0 heartbeats from its join, not from the world's forming: waiting 2.5 TTLs for rank 1
    # must not make it expire at the server (rank 1 would then never see it).
    env = stun_env(server.url, "late")
    results: dict[int, Any] = {}

    def rank(r: int) -> None:
        comm = init("udp", rank=r, size=2, environ=env, timeout=30.0)
        try:
            results[r] = comm.allgather(r)
        finally:
            comm.close()

    first = threading.Thread(target=rank, args=(0,), daemon=True)
    first.start()
    time.sleep(2.5 * TTL_S)
    rank(1)
    first.join(30.0)
    assert results == {0: [0, 1], 1: [0, 1]}
