"""``comfycluster doctor`` and :func:`collectives.doctor.run_checks` against a real rendezvous
server on 127.0.0.1: a good setup, and broken ones that must print the right fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collectives import _compiled
from collectives.auth import ClusterKey
from collectives.doctor import Check, report, run_checks
from collectives.rendezvous.stun_client import Candidate, StunClient
from comfyui_cluster.launchers.invite import Invite, make_token
from tests.stun.server_proc import ALPHA_KEY, StunProcess, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[StunProcess]:
    proc = StunProcess().start()
    yield proc
    proc.stop()


def _stun_env(url: str, key: str = ALPHA_KEY, cluster: str = "alpha") -> dict[str, str]:
    return {
        "COMFY_CLUSTER_REGISTRATION_MODE": "stun",
        "COMFY_CLUSTER_STUN_SERVER": url,
        "COMFY_CLUSTER_CLUSTER_ID": cluster,
        "COMFY_CLUSTER_KEY": key,
    }


def _doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COMFY_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "comfyui_cluster.launchers.tool", "doctor", *args],
        env=base,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _line(out: str, name: str) -> str:
    (line,) = [x for x in out.splitlines() if f" {name}:" in x]
    return line


def test_a_good_setup_passes_every_check(server: StunProcess) -> None:
    got = _doctor(env=_stun_env(server.url))
    assert got.returncode == 0, got.stdout + got.stderr
    for name in (
        "discovery",
        "server",
        "key",
        "udp port",
        "nat",
        "mtu",
        "socket buffers",
        "udp core",
        "same-host copies",
    ):
        assert _line(got.stdout, name).startswith("ok "), got.stdout
    assert f"UDP port {server.udp_port}" in _line(got.stdout, "server")
    assert "no NAT towards the server" in _line(got.stdout, "nat")
    assert "1200 B datagrams" in _line(got.stdout, "mtu")
    assert got.stdout.rstrip().endswith("no problem found")
    assert ALPHA_KEY not in got.stdout + got.stderr
    core = _compiled.status()
    assert (core["why"] if core["mode"] == "python" else "compiled (mypyc)") in _line(
        got.stdout, "udp core"
    )


def test_doctor_takes_an_invite(server: StunProcess) -> None:
    token = make_token(Invite(server.url, "alpha", ALPHA_KEY, int(time.time()) + 600))
    got = _doctor("--join", token)
    assert got.returncode == 0, got.stdout + got.stderr
    assert _line(got.stdout, "invite").startswith("ok ")
    assert _line(got.stdout, "key").startswith("ok ")


def test_an_expired_invite_is_a_problem_with_its_fix(server: StunProcess) -> None:
    token = make_token(Invite(server.url, "alpha", ALPHA_KEY, int(time.time()) - 60))
    got = _doctor("--join", token)
    assert got.returncode == 1
    line = _line(got.stdout, "invite")
    assert line.startswith("PROBLEM") and "expired" in line and "comfycluster invite" in line


def test_wrong_key_names_the_key_and_the_invite(server: StunProcess) -> None:
    got = _doctor(env=_stun_env(server.url, key="wrong-key-0123456789"))
    assert got.returncode == 1
    line = _line(got.stdout, "key")
    assert line.startswith("PROBLEM")
    assert "COMFY_CLUSTER_KEY" in line and "COMFY_CLUSTER_AUTH_KEYS" in line
    assert "comfycluster invite" in line
    assert _line(got.stdout, "server").startswith("ok ")
    assert "1 problem(s) found" in got.stdout


def test_server_down_names_the_server_variable() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    got = _doctor(env=_stun_env(down))
    assert got.returncode == 1
    line = _line(got.stdout, "server")
    assert line.startswith("PROBLEM") and "cannot reach" in line
    assert "COMFY_CLUSTER_STUN_SERVER" in line and "comfycluster-stun" in line
    # what does not need the server is still checked
    assert _line(got.stdout, "udp port").startswith("ok ")
    assert _line(got.stdout, "socket buffers").startswith("ok ")


def test_a_server_without_its_udp_port_is_a_problem() -> None:
    proc = StunProcess(udp=False).start()
    try:
        checks = _by_name(run_checks(_stun_env(proc.url)))
    finally:
        proc.stop()
    assert not checks["nat"].ok and "--udp-port" in checks["nat"].fix


def test_tiny_socket_buffers_print_the_sysctl(server: StunProcess) -> None:
    # The kernel grants what it grants here; a threshold above it stands for a small grant.
    checks = _by_name(run_checks(_stun_env(server.url), buffer_wanted=1 << 30))
    buffers = checks["socket buffers"]
    assert not buffers.ok
    assert "sysctl -w net.core.rmem_max=16777216" in buffers.fix
    assert "sysctl -w net.core.wmem_max=16777216" in buffers.fix
    assert "asked 16.0 MiB" in buffers.detail
    assert "PROBLEM  socket buffers:" in report(list(checks.values()))


def test_missing_cluster_id_names_the_variable(server: StunProcess) -> None:
    env = _stun_env(server.url)
    del env["COMFY_CLUSTER_CLUSTER_ID"]
    checks = _by_name(run_checks(env))
    assert not checks["discovery"].ok
    assert "COMFY_CLUSTER_CLUSTER_ID" in checks["discovery"].fix
    assert "server" not in checks  # nothing to ask the server without a cluster


def test_a_port_in_use_names_the_port_variable(server: StunProcess) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        env = {
            **_stun_env(server.url),
            "COMFY_CLUSTER_DIRECT_LISTEN_PORT": str(taken.getsockname()[1]),
        }
        checks = _by_name(run_checks(env))
    assert not checks["udp port"].ok
    assert "COMFY_CLUSTER_DIRECT_LISTEN_PORT" in checks["udp port"].fix


def test_runpod_pod_is_advertised_by_its_internal_name(server: StunProcess) -> None:
    env = {**_stun_env(server.url), "RUNPOD_POD_ID": "abc123"}
    checks = _by_name(run_checks(env))
    assert "abc123.runpod.internal (RUNPOD_POD_ID)" in checks["udp port"].detail


def test_peers_claimed_bound_and_silent(server: StunProcess) -> None:
    client = StunClient(server.url, "alpha", ClusterKey(ALPHA_KEY))
    try:
        client.join("claimed", rank=0, world_size=4, candidates=[])
        client.join("silent", rank=1, world_size=4, candidates=[Candidate("10.1.2.3", 4000)])
        checks = _by_name(run_checks(_stun_env(server.url)))
    finally:
        for instance in ("claimed", "silent"):
            client.leave(instance)
        client.close()
    assert checks["peer rank 0"].ok and "claimed by a launcher" in checks["peer rank 0"].detail
    silent = checks["peer rank 1"]
    assert not silent.ok and "10.1.2.3:4000 (local)" in silent.detail
    assert "UDP" in silent.fix
    assert "rank(s) 2, 3 of 4 not registered" in checks["peers"].detail


def _netns_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a network namespace)"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare and ip"
    return None


@pytest.mark.netns
@pytest.mark.skipif(_netns_reason() is not None, reason=str(_netns_reason()))
def test_a_route_mtu_below_the_datagram_size_prints_the_mtu_setting() -> None:
    """In a namespace whose loopback carries 1230 B packets, 1200 B relayed datagrams (1238 B
    packets) do not fit: the fix names COMFY_CLUSTER_UDP_MTU with a size that does."""
    script = (
        "from tests.stun.server_proc import StunProcess, ALPHA_KEY\n"
        "from collectives.doctor import run_checks\n"
        "p = StunProcess().start()\n"
        "env = {'COMFY_CLUSTER_REGISTRATION_MODE': 'stun', 'COMFY_CLUSTER_STUN_SERVER': p.url,\n"
        "       'COMFY_CLUSTER_CLUSTER_ID': 'alpha', 'COMFY_CLUSTER_KEY': ALPHA_KEY}\n"
        "try:\n"
        "    print('\\n'.join(c.line() for c in run_checks(env)))\n"
        "finally:\n"
        "    p.stop()\n"
    )  # run with -c from the repository root: `tests` and `collectives` import from there
    got = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo mtu 1230 up && exec "$0" -c "$1"',
         sys.executable, script],
        check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    line = _line(got.stdout, "mtu")
    assert line.startswith("PROBLEM") and "route towards 127.0.0.1 carries 1230 B" in line
    assert "COMFY_CLUSTER_UDP_MTU=1192" in line
