"""Fixtures for end-to-end tests on real ComfyUI servers.

The tests run in the dev venv (.venv); ComfyUI runs in subprocesses with the python of the
ComfyUI environment, .venv-comfy (built by tools/comfyui/install.sh; another one can be named
with COMFY_E2E_PYTHON).  Without it every test here fails with the command to run: a missing
environment must not pass silently as skipped tests.

Tiny random-weight models are built once per session; clusters are started once per module by
the test modules (a ComfyUI server takes 8-15 s to start on two cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from comfyui_cluster.launchers.config import port_in_use

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "comfyui"
TEST_NODES = TOOLS / "test_nodes"
RUNNER = REPO / "launchers" / "comfyui_run.py"
INSTALL = "tools/comfyui/install.sh"


@dataclass(frozen=True)
class ComfyEnv:
    """What every end-to-end test needs: the ComfyUI python and the tiny models."""

    python: str
    models: Path  # a ComfyUI models folder (diffusion_models/, vae_approx/)
    version: str


def _comfy_python() -> str:
    return os.environ.get("COMFY_E2E_PYTHON") or str(REPO / ".venv-comfy" / "bin" / "python")


@pytest.fixture(scope="session")
def comfy_python() -> str:
    python = _comfy_python()
    if not Path(python).exists():
        pytest.fail(
            f"no ComfyUI environment at {python}: run {INSTALL} (from the repository root) "
            "first, or set COMFY_E2E_PYTHON to the python of one",
            pytrace=False,
        )
    done = subprocess.run(
        [python, str(RUNNER), "--probe"], capture_output=True, text=True, timeout=120, check=False
    )
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {"error": f"probe failed (exit {done.returncode}): {done.stderr[-500:]}"}
    if "error" in report:
        pytest.fail(f"{python} cannot run ComfyUI: {report['error']}; run {INSTALL}", pytrace=False)
    return python


@pytest.fixture(scope="session")
def comfy_env(comfy_python: str, tmp_path_factory: pytest.TempPathFactory) -> ComfyEnv:
    models = tmp_path_factory.mktemp("comfy-models")
    done = subprocess.run(
        [comfy_python, str(TOOLS / "make_tiny_sd.py"), str(models)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"make_tiny_sd.py failed:\n{done.stdout}\n{done.stderr}"
    probe = subprocess.run(
        [comfy_python, str(RUNNER), "--probe"], capture_output=True, text=True, check=True
    )
    return ComfyEnv(comfy_python, models, json.loads(probe.stdout)["version"])


def make_base(root: Path, models: Path) -> Path:
    """A fresh ComfyUI base directory whose models folder is the shared tiny models."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(models, target_is_directory=True)
    return root


@contextlib.contextmanager
def running_pair(env: ComfyEnv, root: Path, cluster_env: dict[str, str]) -> Iterator[Any]:
    """A 2-rank ComfyUI cluster on udp under ``root`` (its log in ``root/cluster.log``), with
    ``cluster_env`` in every rank's environment; ready when entered, stopped on exit."""
    from comfyui_cluster.launchers.comfyui import ComfyClusterConfig, start_comfy_cluster

    config = ComfyClusterConfig(
        nproc=2,
        port=free_port_range(2),
        base_directory=str(make_base(root / "base", env.models)),
        python=env.python,
        backend="udp",
        extra_custom_nodes=[str(TEST_NODES)],
        ready_timeout_s=240,
        env=cluster_env,
    )
    with (root / "cluster.log").open("w", buffering=1) as log:
        comfy = start_comfy_cluster(config, stdout=log)
        try:
            comfy.wait_ready()
            yield comfy
        finally:
            comfy.stop()


_taken: set[int] = set()


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """First port of ``count`` consecutive free ports, none handed out before in this test run.

    Below the usual ephemeral range (32768+), so that outgoing connections and free ports the
    rendezvous picks cannot land on a server port between this check and the server's bind.
    """
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - count)
        ports = range(first, first + count)
        if any(p in _taken for p in ports):
            continue
        if not any(port_in_use(host, p) for p in ports):
            _taken.update(ports)
            return first
    raise RuntimeError(f"no {count} consecutive free ports found on {host}")


def tail(path: Path, lines: int = 80) -> str:
    """The end of a log file, for assertion messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_line(
    path: Path, needles: Iterable[str], proc: subprocess.Popen[bytes], timeout: float
) -> str:
    """Block until a line of the log contains one of ``needles``; returns that line.

    Fails (with the log's tail) when ``proc`` exits first or ``timeout`` passes.
    """
    wanted = list(needles)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if any(n in line for n in wanted):
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(
        f"none of {wanted} in the output (exit {proc.poll()}) after {timeout:g} s:\n{tail(path)}"
    )


def launcher_command(*args: str) -> list[str]:
    """``comfycluster-launch`` as the dev venv runs it."""
    return [sys.executable, "-m", "comfyui_cluster.launchers", *args]
