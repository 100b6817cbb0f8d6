"""Start a benchmark world (mpiexec, our launcher, or threads) and collect the ranks' reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks._worker import Progress, WorkerSpec, run_local_world
from comfyui_cluster.launchers.launch import THP_ENV

REPO = Path(__file__).resolve().parents[1]
_POLL_S = 0.2
_LOG_TAIL = 60  # lines of a failed world's output worth showing


@dataclass
class WorldRun:
    backend: str
    size: int
    command: list[str]
    reports: list[dict[str, Any]]  # one per rank that reported, in rank order
    returncode: int
    seconds: float
    log_tail: str
    cells: int  # how many cells every rank should have finished
    timed_out: bool = False

    @property
    def complete(self) -> bool:
        """Every rank reported every cell (whatever happened at exit)."""
        return len(self.reports) == self.size and all(
            not rep.get("error") and len(rep["cells"]) == self.cells for rep in self.reports
        )

    @property
    def error(self) -> str | None:
        """Why some results are missing, or None when all are in."""
        for rep in self.reports:
            if rep.get("error"):
                err = rep["error"]
                return (
                    f"rank {rep['rank']} failed in {err['op']} {err['size']} B:\n{err['traceback']}"
                )
        if self.complete:
            return None
        if self.timed_out:
            return f"stopped after the {self.seconds:.0f} s timeout (--timeout)\n{self.log_tail}"
        if self.returncode != 0:
            return f"exit status {self.returncode}\n{self.log_tail}"
        return f"only {len(self.reports)} of {self.size} ranks reported\n{self.log_tail}"

    @property
    def shutdown_error(self) -> str | None:
        """A world that finished every cell but then exited badly: the results stand, the exit
        is somebody's bug worth seeing (not a reason to throw the numbers away)."""
        if self.complete and self.returncode != 0:
            return f"exit status {self.returncode} after all ranks finished\n{self.log_tail}"
        return None


def world_command(backend: str, size: int, spec_path: Path, timeout: float) -> list[str]:
    worker = [sys.executable, "-m", "benchmarks._worker", str(spec_path)]
    if backend == "mpi":
        from collectives.testing.spmd import mpiexec  # imports torch: only when needed

        return [mpiexec(), "-n", str(size), *worker]
    return [
        sys.executable,
        "-m",
        "comfyui_cluster.launchers",
        "--nproc",
        str(size),
        "--backend",
        backend,
        "--timeout",
        str(timeout),
        "--",
        *worker,
    ]


def run_world(spec: WorkerSpec, size: int, progress: Progress | None, timeout: float) -> WorldRun:
    """Run ``spec`` on ``size`` ranks of ``spec.backend`` and gather what every rank reported."""
    started = time.monotonic()
    if spec.backend == "local":
        try:
            reports = run_local_world(spec, size, progress)
            code, tail = 0, ""
        except Exception as exc:
            reports, code, tail = [], 1, f"{type(exc).__name__}: {exc}"
        seconds = time.monotonic() - started
        return WorldRun(
            spec.backend, size, ["<threads>"], reports, code, seconds, tail, len(spec.cells())
        )

    with tempfile.TemporaryDirectory(prefix="collectives-bench-") as tmp:
        out = Path(tmp)
        spec = replace(spec, out=str(out))
        spec.save(out / "spec.json")
        command = world_command(spec.backend, size, out / "spec.json", timeout)
        code, tail, timed_out = _run_and_follow(command, out, progress, timeout, spec.env)
        reports = [
            json.loads(path.read_text())
            for rank in range(size)
            if (path := out / f"rank{rank}.json").exists()
        ]
    seconds = time.monotonic() - started
    cells = len(spec.cells())
    return WorldRun(spec.backend, size, command, reports, code, seconds, tail, cells, timed_out)


def _run_and_follow(
    command: list[str],
    out: Path,
    progress: Progress | None,
    timeout: float,
    extra_env: dict[str, str] | None = None,
) -> tuple[int, str, bool]:
    """Run ``command`` to its end or ``timeout``; (exit status, log tail, timed out)."""
    env = dict(os.environ)
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Two cores, several ranks: intra-op threads would only fight the ranks for them.
    env.setdefault("OMP_NUM_THREADS", "1")
    # What comfycluster-launch gives its ranks (launchers.launch.THP_ENV), for mpiexec's too:
    # every engine of a run allocates its tensors alike.
    env.setdefault(THP_ENV, "1")
    log_path = out / "world.log"
    progress_path = out / "progress"
    deadline = time.monotonic() + timeout
    timed_out = False
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        follow = _ProgressFollower(progress_path, progress)
        try:
            while proc.poll() is None:
                follow.poll()
                if time.monotonic() > deadline:
                    timed_out = True
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    break
                time.sleep(_POLL_S)
            follow.poll()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    lines = log_path.read_text(errors="replace").splitlines()
    return proc.returncode, "\n".join(lines[-_LOG_TAIL:]), timed_out


class _ProgressFollower:
    """Reads the lines rank 0 appends to the progress file and hands them on."""

    def __init__(self, path: Path, sink: Callable[[int, int, str], None] | None) -> None:
        self._path = path
        self._sink = sink
        self._offset = 0

    def poll(self) -> None:
        if self._sink is None or not self._path.exists():
            return
        with self._path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            done, total, label = line.split("\t", 2)
            self._sink(int(done), int(total), label)
