"""Attacks on the gloo rendezvous: real rank processes on loopback, an intruder in this process.

The genuine ranks share a cluster key; the intruder has none, or a wrong one, or speaks torch's
own TCPStore protocol (what a keyless process could use against the old store).  Whatever it
does, the world forms with the genuine ranks and runs a collective.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from collectives.auth import ClusterKey
from collectives.errors import AuthenticationError, ConfigurationError

pytestmark = pytest.mark.gloo

REPO = Path(__file__).resolve().parents[2]
KEY = "security-test-cluster-key-0123456789"
RANK_SCRIPT = """
import os, sys, time
import torch
import collectives
comm = collectives.init("gloo", timeout=float(os.environ.get("T", "30")))
t = torch.ones(4) * (comm.rank + 1)
comm.allreduce(t)
print("SUM", t.tolist(), flush=True)
if os.environ.get("HOLD"):
    print("READY", flush=True)
    sys.stdin.readline()
comm.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(rank: int, port: int, addr: str = "127.0.0.1", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFY_CLUSTER_", "GLOO_"))}
    env.update(
        PYTHONPATH=str(REPO),
        RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        COMFY_CLUSTER_KEY=KEY,
    )
    env.update(extra)
    return {k: v for k, v in env.items() if v}


def _spawn(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RANK_SCRIPT],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate()


def _wait_listening(port: int, proc: subprocess.Popen[str], limit: float = 30.0) -> None:
    """Until rank 0's store accepts connections (a bare connect, dropped by its handshake)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail("rank 0 never opened its store")


def _finish(proc: subprocess.Popen[str], limit: float = 60.0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=limit)
    assert proc.returncode == 0, err
    assert "SUM [3.0, 3.0, 3.0, 3.0]" in out, (out, err)
    return out, err


def test_keyless_and_wrong_key_intruders_are_refused_and_the_world_forms(
    procs: list[subprocess.Popen[str]],
) -> None:
    from collectives.rendezvous.store import StoreClient

    port = _free_port()
    procs.append(_spawn(_env(0, port)))
    _wait_listening(port, procs[0])
    for key, match in [
        (None, "COMFY_CLUSTER_KEY"),
        (ClusterKey("wrong-key-0123456789abc"), "refused this process"),
    ]:
        with pytest.raises(AuthenticationError, match=match):
            StoreClient("127.0.0.1", port, key)  # so it can read no check-in and claim nothing
    procs.append(_spawn(_env(1, port)))
    _, err0 = _finish(procs[0])
    _finish(procs[1])
    assert "refused" in err0 and "wrong cluster key" in err0  # logged on rank 0's side


def test_intruder_claiming_rank_1_first_does_not_get_it(
    procs: list[subprocess.Popen[str]],
) -> None:
    import torch.distributed as dist

    port = _free_port()
    procs.append(_spawn(_env(0, port)))
    _wait_listening(port, procs[0])
    # What a keyless process could do to a TCPStore: claim rank 1 and announce its own address.
    with pytest.raises((RuntimeError, OSError)):
        intruder = dist.TCPStore(
            "127.0.0.1", port, 2, False, timeout=timedelta(seconds=3), wait_for_workers=False
        )
        intruder.add("collectives/checkin/default/claims/1", 1)
        intruder.set("collectives/checkin/default/1", "10.6.6.6")
    procs.append(_spawn(_env(1, port)))
    _finish(procs[0])
    _finish(procs[1])


def test_garbage_connections_do_not_crash_rank_0s_store(
    procs: list[subprocess.Popen[str]],
) -> None:
    port = _free_port()
    procs.append(_spawn(_env(0, port)))
    _wait_listening(port, procs[0])
    silent = socket.create_connection(("127.0.0.1", port), timeout=15)
    for data in (b"\x00" * 5000, b"GET / HTTP/1.0\r\n\r\n", os.urandom(70), b"CCRS\x01"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert _read_to_eof(sock, 37).startswith(b"CCRS")  # greeted with a challenge
            with contextlib.suppress(ConnectionError):  # it may hang up before taking it all
                sock.sendall(data)
            _read_to_eof(sock)  # then dropped
    procs.append(_spawn(_env(1, port)))
    _finish(procs[0])
    _finish(procs[1])
    with silent:  # a connection that never answers the challenge is dropped too
        assert _read_to_eof(silent).startswith(b"CCRS")


def _read_to_eof(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):  # a reset is a hang-up too
        while len(data) < limit and (chunk := sock.recv(limit - len(data))):
            data += chunk
    return data


def _listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, port) of every TCP socket in LISTEN state owned by ``pids``."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hex_addr, hex_port = local.split(":")
                raw = bytes.fromhex(hex_addr)
                # /proc prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if width == 4 else socket.AF_INET6
                found.append((socket.inet_ntop(family, words), int(hex_port, 16)))
    return found


def test_no_rank_listens_on_the_wildcard(procs: list[subprocess.Popen[str]]) -> None:
    port = _free_port()
    procs.extend(_spawn(_env(r, port, HOLD="1")) for r in (0, 1))
    for p in procs:
        assert p.stdout is not None
        lines = []
        while "READY" not in lines:
            line = p.stdout.readline()
            assert line, p.communicate()
            lines.append(line.strip())
    found = _listeners({p.pid for p in procs})
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
    assert ("127.0.0.1", port) in found, found  # rank 0's store, on MASTER_ADDR
    assert len(found) >= 3, found  # the store and each rank's gloo listener
    wildcard = [(a, p) for a, p in found if a in ("0.0.0.0", "::")]
    assert not wildcard, f"listening on every interface: {wildcard}"
    for p in procs:
        assert p.wait(timeout=60) == 0


@pytest.mark.parametrize(
    ("addr", "extra", "expected"),
    [
        ("no-such-host.invalid", {}, "MASTER_ADDR='no-such-host.invalid' does not resolve"),
        # A non-loopback master (TEST-NET-1, never routed) without a key.
        ("192.0.2.1", {"COMFY_CLUSTER_KEY": ""}, "no cluster key is set: set COMFY_CLUSTER_KEY"),
    ],
)
def test_bad_master_fails_fast_on_every_rank(
    procs: list[subprocess.Popen[str]], addr: str, extra: dict[str, str], expected: str
) -> None:
    port = _free_port()
    start = time.monotonic()
    procs.extend(_spawn(_env(r, port, addr, T="60", **extra)) for r in (0, 1))
    for p in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode != 0
        assert "ConfigurationError" in err and expected in err, err
    assert time.monotonic() - start < 10


def test_insecure_flag_accepts_a_keyless_non_loopback_master_knowingly() -> None:
    pytest.importorskip("torch.distributed")
    from collectives.backends.base import BackendConfig
    from collectives.backends.torch_dist import TorchBackend

    env = {"MASTER_ADDR": "192.0.2.1", "MASTER_PORT": str(_free_port())}
    config = BackendConfig(rank=0, size=2, timeout=5, environ=env)
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_KEY"):
        TorchBackend.create(config)
    insecure = {**env, "COMFY_CLUSTER_INSECURE": "1"}
    config = BackendConfig(rank=0, size=2, timeout=5, environ=insecure)
    # Past the key check: rank 0 now fails only because 192.0.2.1 is not this host's address.
    with pytest.raises(ConfigurationError, match="cannot listen on MASTER_ADDR") as info:
        TorchBackend.create(config)
    assert "COMFY_CLUSTER_KEY" not in str(info.value)
