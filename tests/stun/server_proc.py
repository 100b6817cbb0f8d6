"""A real ``python -m stun`` process on 127.0.0.1, for the tests that need one, and the rank
side the UDP tests register with it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
ALPHA_KEY = "alpha-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
KEYS = {"alpha": ALPHA_KEY, "beta": BETA_KEY}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StunProcess:
    """Starts the server with ``env`` on fresh ports; ``restart()`` keeps the ports."""

    def __init__(self, env: Mapping[str, str] | None = None, *, udp: bool = True) -> None:
        self.port = free_port()
        self.udp_port = free_port(socket.SOCK_DGRAM) if udp else None
        self.env = {
            "COMFY_CLUSTER_AUTH_KEYS": f"alpha:{ALPHA_KEY},beta:{BETA_KEY}",
            "COMFY_CLUSTER_STUN_ADMIN_KEY": ADMIN_KEY,
            "COMFY_CLUSTER_STUN_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> StunProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFY_", "STUN_"))}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO)
        args = [sys.executable, "-m", "stun", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--udp-host", "127.0.0.1", "--udp-port", str(self.udp_port or -1)]
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {err}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("the server did not answer /health within 20 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        """A crash, not a shutdown: nothing gets to clean up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> StunProcess:
        self.stop()
        return self.start()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0)


@contextlib.contextmanager
def serving(env: Mapping[str, str] | None = None) -> Iterator[StunProcess]:
    """A started server, stopped on the way out (module fixtures and one-off servers)."""
    proc = StunProcess(env).start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Rank:
    """A member registered at the server with its own UDP socket."""

    cluster: str
    instance_id: str
    token: bytes
    handle: bytes
    sock: socket.socket

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return str(host), int(port)
