"""Worlds of udp ranks for the tests/backends udp tests: threads of the test process, or real
processes started by the launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collectives.communicator import Communicator
from collectives.world import init


def run_world(
    n: int,
    env: dict[str, str] | list[dict[str, str]],
    fn: Callable[[Communicator], Any],
    *,
    ranked: bool = True,
    timeout: float = 20.0,
) -> list[Any]:
    """``fn(comm)`` on ``n`` ranks (threads); the results in rank order.  ``ranked=False``
    starts them without rank/size: the server assigns them (results are still by rank)."""
    envs = env if isinstance(env, list) else [env] * n
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def main(index: int) -> None:
        try:
            if ranked:
                comm = init("udp", rank=index, size=n, environ=envs[index], timeout=timeout)
            else:
                comm = init(environ=envs[index], timeout=timeout)
        except BaseException as err:
            errors.append(err)
            return
        try:
            results[comm.rank] = fn(comm)
        except BaseException as err:
            errors.append(err)
            comm.abort(repr(err))
        finally:
            comm.close()

    threads = [threading.Thread(target=main, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout + 30
    for t in threads:
        t.join(max(end - time.monotonic(), 0.1))
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    assert sorted(results) == list(range(n)), sorted(results)
    return [results[r] for r in range(n)]


ROOT = Path(__file__).resolve().parents[2]


def launched_world(
    tmp_path: Path, script: str, env: dict[str, str], n: int
) -> dict[int, dict[str, Any]]:
    """Run ``script`` on ``n`` udp ranks started by ``comfycluster-launch`` (real processes,
    this environment plus ``env``); each rank writes its report as ``rank<r>.json`` into the
    folder its first argument names.  The reports by rank."""
    path = tmp_path / "world.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "comfyui_cluster.launchers", "--nproc", str(n),
           "--backend", "udp", "--", sys.executable, str(path), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)}
