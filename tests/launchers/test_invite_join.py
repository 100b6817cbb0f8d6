"""``comfycluster-launch --join TOKEN``: real launches of tiny python ranks against a real
``python -m stun`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from collectives.auth import ClusterKey
from collectives.rendezvous.stun_client import StunClient, StunConflictError
from comfyui_cluster.launchers.comfyui import hoist_subcommand
from comfyui_cluster.launchers.comfyui import parse_command as comfy_parse
from comfyui_cluster.launchers.comfyui_config import ComfyClusterConfig
from comfyui_cluster.launchers.invite import Invite, make_token
from comfyui_cluster.launchers.join import apply_claim, claim_ranks, joining
from tests.stun.server_proc import ALPHA_KEY, BETA_KEY, StunProcess, free_port

pytestmark = pytest.mark.udp

REPO = Path(__file__).resolve().parents[2]
SHOWN = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "COMFY_CLUSTER_BACKEND", "COMFY_CLUSTER_REGISTRATION_MODE",
    "COMFY_CLUSTER_STUN_SERVER", "COMFY_CLUSTER_CLUSTER_ID", "COMFY_CLUSTER_KEY",
    "COMFY_CLUSTER_KEY_FILE", "COMFY_CLUSTER_INSTANCE_ID",
)  # fmt: skip
PRINT_ENV = (
    f"import json, os; print('ENV ' + json.dumps({{k: os.environ.get(k) for k in {SHOWN!r}}}))"
)
# A rank that forms the world, reports when (wall clock) and what the doctor sees from inside.
FORM = """
import json, os, sys, time
import collectives
from collectives.doctor import run_checks
delay = float(os.environ.get("TEST_DELAY_S_" + os.environ["RANK"], "0"))
time.sleep(delay)
comm = collectives.init(timeout=30)
formed = time.time()
got = comm.allgather(comm.rank)
lines = [c.line() for c in run_checks(comm=comm) if c.name.startswith("path to rank")]
comm.barrier()  # both have looked before either leaves (a peer that closed reads "lost")
print("FORMED " + json.dumps({"rank": comm.rank, "size": comm.size, "at": formed,
                              "allgather": got, "paths": lines}))
comm.close()
"""


@pytest.fixture
def server() -> Iterator[StunProcess]:
    proc = StunProcess({"COMFY_CLUSTER_STUN_TTL_S": "3", "COMFY_CLUSTER_STUN_HEARTBEAT_S": "1"})
    proc.start()
    yield proc
    proc.stop()


def _token(server: StunProcess, **over: object) -> str:
    fields: dict[str, object] = {
        "server": server.url, "cluster_id": "alpha", "key": ALPHA_KEY,
        "expires": int(time.time()) + 600, "world_size": 2,
    }  # fmt: skip
    fields.update(over)
    return make_token(Invite(**fields))  # type: ignore[arg-type]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFY_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _launch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "comfyui_cluster.launchers", *args],
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _tagged(out: str, tag: str) -> list[dict[str, object]]:
    return [json.loads(line.split(tag + " ", 1)[1]) for line in out.splitlines() if tag in line]


def _members(server: StunProcess) -> list[dict[str, object]]:
    answer = httpx.get(
        server.url + "/v1/clusters/alpha/members", headers={"X-Cluster-Key": ALPHA_KEY}
    )
    return list(answer.json()["members"])


def test_join_sets_the_stun_env_for_every_rank(server: StunProcess, tmp_path: Path) -> None:
    keyfile = tmp_path / "other-key"
    keyfile.write_text("some-other-key-0123456789")
    env = _env(COMFY_CLUSTER_KEY_FILE=str(keyfile))  # an inherited key must not clash
    code, out, err = _finish(
        _launch("--join", _token(server, world_size=3), "--nproc", "2", "--",
                sys.executable, "-c", PRINT_ENV, env=env)
    )  # fmt: skip
    assert code == 0, err
    envs = sorted(_tagged(out, "ENV"), key=lambda e: str(e["RANK"]))
    assert [e["RANK"] for e in envs] == ["0", "1"]
    for local, e in enumerate(envs):
        assert e["WORLD_SIZE"] == "3" and e["LOCAL_RANK"] == str(local)
        assert e["COMFY_CLUSTER_BACKEND"] == "udp"
        assert e["COMFY_CLUSTER_REGISTRATION_MODE"] == "stun"
        assert e["COMFY_CLUSTER_STUN_SERVER"] == server.url
        assert e["COMFY_CLUSTER_CLUSTER_ID"] == "alpha"
        assert e["COMFY_CLUSTER_KEY"] == ALPHA_KEY
        assert e["COMFY_CLUSTER_KEY_FILE"] == ""
    ids = {e["COMFY_CLUSTER_INSTANCE_ID"] for e in envs}
    assert len(ids) == 2 and all(isinstance(i, str) and i.endswith(("-0", "-1")) for i in ids)
    assert "joined cluster 'alpha'" in err and "rank(s) 0, 1 of 3" in err
    assert _members(server) == []  # the launcher deleted its claims on the way out


def test_two_home_pcs_join_and_form_a_world_through_the_relay(server: StunProcess) -> None:
    """Two launchers, one rank each, ranks assigned by the server; every peer relayed first."""
    token = _token(server)
    env = _env(COMFY_CLUSTER_NAT_DIRECT="0")  # relay only: the path a NAT leaves first
    began = time.time()
    procs = [
        _launch("--join", token, "--nproc", "1", "--", sys.executable, "-c", FORM, env=env)
        for _ in range(2)
    ]
    results = [_finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err
    formed = [f for _, out, _ in results for f in _tagged(out, "FORMED")]
    assert sorted(f["rank"] for f in formed) == [0, 1]
    assert all(f["allgather"] == [0, 1] and f["size"] == 2 for f in formed)
    for f in formed:
        (line,) = f["paths"]
        assert "ok, path relayed" in str(line), line
    took = max(float(f["at"]) for f in formed) - began  # type: ignore[arg-type]
    print(f"\n--join -> formed communicator (2 launchers, relay): {took:.2f} s")
    assert took < 15.0  # the 2 s target is for the namespaces; CI machines start python slowly


def test_join_formed_time_one_launcher_two_ranks_direct(server: StunProcess) -> None:
    began = time.time()
    code, out, err = _finish(
        _launch("--join", _token(server), "--nproc", "2", "--", sys.executable, "-c", FORM)
    )
    assert code == 0, err
    formed = _tagged(out, "FORMED")
    assert sorted(f["rank"] for f in formed) == [0, 1]
    took = max(float(f["at"]) for f in formed) - began  # type: ignore[arg-type]
    print(f"\n--join -> formed communicator (1 launcher, 2 ranks): {took:.2f} s")
    assert took < 15.0


def test_slow_ranks_keep_their_claims_past_the_server_ttl(server: StunProcess) -> None:
    """TTL 3 s: the launcher heartbeats the claims until the ranks (4 s late) take them over;
    meanwhile nobody else gets those ranks."""
    slow = _env(TEST_DELAY_S_0="4", TEST_DELAY_S_1="4")
    began = time.monotonic()
    proc = _launch("--join", _token(server), "--nproc", "2", "--", sys.executable, "-c", FORM,
                   env=slow)  # fmt: skip
    deadline = began + 10
    while len(_members(server)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(max(3.5 - (time.monotonic() - began), 0))  # past the TTL, before the ranks start
    claims = _members(server)
    assert len(claims) == 2 and all(m["candidates"] == [] for m in claims)
    rival = StunClient(server.url, "alpha", ClusterKey(ALPHA_KEY))
    try:
        with pytest.raises(StunConflictError):
            rival.join("rival", rank=None, world_size=2, candidates=[])
    finally:
        rival.close()
    code, out, err = _finish(proc)
    assert code == 0, err
    assert sorted(f["rank"] for f in _tagged(out, "FORMED")) == [0, 1]


def test_a_rank_waiting_for_a_late_peer_outlives_the_server_ttl(server: StunProcess) -> None:
    """TTL 3 s: rank 0 takes its record over at once and waits 6 s for rank 1; its own
    heartbeats and the launcher's keep it listed."""
    late = _env(TEST_DELAY_S_1="6")
    code, out, err = _finish(
        _launch("--join", _token(server), "--nproc", "2", "--", sys.executable, "-c", FORM,
                env=late)
    )  # fmt: skip
    assert code == 0, err
    assert sorted(f["rank"] for f in _tagged(out, "FORMED")) == [0, 1]


def test_a_full_cluster_names_the_option(server: StunProcess) -> None:
    code, _, err = _finish(
        _launch("--join", _token(server), "--nproc", "3", "--", sys.executable, "-c", "pass")
    )
    assert code == 2
    assert "--nproc" in err
    assert _members(server) == []  # the claims made before the refusal are released


def test_explicit_ranks_with_node_rank_offset(server: StunProcess) -> None:
    code, out, err = _finish(
        _launch("--join", _token(server, world_size=4), "--nproc", "2", "--node-rank-offset",
                "2", "--", sys.executable, "-c", PRINT_ENV)
    )  # fmt: skip
    assert code == 0, err
    assert sorted(str(e["RANK"]) for e in _tagged(out, "ENV")) == ["2", "3"]


def test_expired_token_and_wrong_backend_fail_before_anything_starts(server: StunProcess) -> None:
    code, _, err = _finish(
        _launch("--join", _token(server, expires=int(time.time()) - 5), "--nproc", "1", "--",
                sys.executable, "-c", "print('STARTED')")
    )  # fmt: skip
    assert code == 2 and "expired" in err and "comfycluster invite" in err
    code, out, err = _finish(
        _launch("--join", _token(server), "--backend", "gloo", "--nproc", "1", "--",
                sys.executable, "-c", "print('STARTED')")
    )  # fmt: skip
    assert code == 2 and "--backend" in err and "STARTED" not in out


def test_server_down_names_the_server(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    token = make_token(Invite(down, "alpha", ALPHA_KEY, int(time.time()) + 60, 2))
    path = tmp_path / "token"
    path.write_text(token + "\n")
    code, _, err = _finish(
        _launch("--join", f"@{path}", "--nproc", "1", "--", sys.executable, "-c", "pass")
    )
    assert code == 1
    assert "COMFY_CLUSTER_STUN_SERVER" in err and down in err


def test_wrong_key_names_the_key(server: StunProcess) -> None:
    code, _, err = _finish(
        _launch("--join", _token(server, key="x" * 20), "--nproc", "1", "--", sys.executable,
                "-c", "pass")
    )  # fmt: skip
    assert code == 1 and "COMFY_CLUSTER_KEY" in err


def test_comfyui_mode_takes_join_and_the_claim(server: StunProcess) -> None:
    args = hoist_subcommand(
        ["--nproc", "2", "--join", "T", "comfyui", "--port", "9000"], {"comfyui"}
    )
    assert args[0] == "comfyui"
    config, ns = comfy_parse(args[1:])
    assert ns.join == "T" and ns.node_rank_offset is None and config.rank_offset == 0
    invite = Invite(server.url, "alpha", ALPHA_KEY, int(time.time()) + 60, 3)
    with joining(make_token(invite), nproc=2, world_size=None, first_rank=None,
                 backend=None) as claim:  # fmt: skip
        applied = apply_claim(ComfyClusterConfig(nproc=2, env={"X": "1"}), claim)
        assert applied.ranks == [0, 1] and applied.world_size == 3
        assert applied.backend == "udp" and applied.env["X"] == "1"
        assert applied.env["COMFY_CLUSTER_KEY"] == ALPHA_KEY
        assert applied.per_rank_env is not None
        from comfyui_cluster.launchers.config import RankSlot

        ids = {applied.per_rank_env(RankSlot(r, r, 3, 2))["COMFY_CLUSTER_INSTANCE_ID"]
               for r in (0, 1)}  # fmt: skip
        assert ids == set(claim.instance_ids.values())
        assert {m["instance_id"] for m in _members(server)} == ids
    assert _members(server) == []


def test_world_size_must_be_known(server: StunProcess) -> None:
    invite = Invite(server.url, "beta", BETA_KEY, int(time.time()) + 60)
    with pytest.raises(ValueError, match="--world-size"):
        claim_ranks(invite, 1)
    client = StunClient(server.url, "beta", ClusterKey(BETA_KEY))
    try:
        assert client.members().members == ()  # nothing was claimed
    finally:
        client.close()
