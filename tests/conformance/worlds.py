"""Start real multi-process worlds that run the conformance runner, once per configuration."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from collectives.testing import launch_command

ROOT = Path(__file__).resolve().parents[2]


def _command(kind: str, n: int, out: Path, extra: list[str]) -> list[str]:
    runner = [sys.executable, "-m", "collectives.testing.runner", "--out", str(out), *extra]
    return launch_command(kind, n, runner)


@functools.cache
def run_world(
    kind: str,
    n: int,
    scenario: str | None = None,
    timeout: float = 60.0,
    device: str | None = None,
    environ: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    """Run the runner on ``n`` ranks of backend ``kind``; return the reports and the exit code.

    ``device`` runs the device checks on that device instead of the CPU suite; ``environ``:
    variables every rank gets on top of this process's.
    """
    out = Path(tempfile.mkdtemp(prefix=f"conf-{kind}-{n}-"))
    extra = ["--timeout", str(timeout)]
    if scenario:
        extra += ["--scenario", scenario]
    if device:
        extra += ["--device", device]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **dict(environ))
    proc = subprocess.run(
        _command(kind, n, out, extra),
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
    )
    reports = {}
    for rank in range(n):
        path = out / f"rank{rank}.json"
        if path.exists():
            reports[rank] = json.loads(path.read_text())
    return {"returncode": proc.returncode, "reports": reports, "log": proc.stdout + proc.stderr}


def check_result(
    kind: str,
    n: int,
    name: str,
    device: str | None = None,
    environ: tuple[tuple[str, str], ...] = (),
) -> None:
    world = run_world(kind, n, device=device, environ=environ)
    reports = world["reports"]
    assert len(reports) == n, f"only ranks {sorted(reports)} reported:\n{world['log'][-4000:]}"
    failures = {
        rank: rep["checks"][name]["error"]
        for rank, rep in reports.items()
        if not rep["checks"][name]["ok"]
    }
    assert not failures, "\n".join(f"rank {r}: {e}" for r, e in failures.items())
