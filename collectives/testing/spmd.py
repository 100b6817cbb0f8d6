"""Run one SPMD function on every rank of a world of any registered backend.

:func:`run_spmd` is :func:`~collectives.testing.run_local` for every backend: in-process
backends (``local``, and any listed with :func:`register_in_process`) run their ranks as threads
of this process; every other backend runs them as processes, started by the command
:func:`launch_command` builds (``mpiexec -n N`` for ``mpi``, ``comfycluster-launch --nproc N
--backend NAME`` otherwise, or whatever :func:`register_launcher` set for the backend).  Each
process runs ``python -m collectives.testing.spmd --fn MODULE:NAME``, calls ``NAME(comm)`` and
writes its result (JSON; anything else as its ``repr``) or its error to a file per rank, so a
function for a process world must be importable by name (a module-level ``def``, not a lambda).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import collectives.errors as errors_module
from collectives.communicator import Communicator
from collectives.errors import (
    CollectivesError,
    CollectiveTimeoutError,
    CommunicatorAbortedError,
    ConnectionLostError,
    InvalidArgumentError,
)
from collectives.world import init

T = TypeVar("T")
# (size, the command every rank runs) -> the command that starts the world
Launcher = Callable[[int, list[str]], list[str]]

_IN_PROCESS: set[str] = {"local"}
_LAUNCHERS: dict[str, Launcher] = {}


def register_in_process(backend: str) -> None:
    """Run ``backend``'s ranks as threads of one process (its ranks meet by ``world=``)."""
    _IN_PROCESS.add(backend)


def register_launcher(backend: str, launcher: Launcher) -> None:
    """Start ``backend``'s process worlds with ``launcher(size, command)``."""
    _LAUNCHERS[backend] = launcher


def mpiexec() -> str:
    """The ``mpiexec`` next to this interpreter (pip's mpich), else the one on PATH."""
    found = Path(sys.executable).parent / "mpiexec"
    if found.exists():
        return str(found)
    which = shutil.which("mpiexec")
    if not which:
        raise errors_module.BackendUnavailableError("mpiexec not found: pip install mpi4py mpich")
    return which


register_launcher("mpi", lambda n, command: [mpiexec(), "-n", str(n), *command, "--backend", "mpi"])


def launch_command(backend: str, size: int, command: list[str]) -> list[str]:
    """The command that runs ``command`` on ``size`` ranks of ``backend``, as processes."""
    launcher = _LAUNCHERS.get(backend)
    if launcher is not None:
        return launcher(size, command)
    launch = [sys.executable, "-m", "comfyui_cluster.launchers", "--nproc", str(size)]
    launch += ["--backend", backend]
    return [*launch, "--", *command]


def run_spmd(
    backend: str,
    size: int,
    fn: Callable[[Communicator], T],
    *,
    timeout: float = 120.0,
    op_timeout: float | None = None,
) -> list[T]:
    """Call ``fn(comm)`` on ``size`` ranks of ``backend``; each rank's result, in rank order.

    The first failing rank's error is raised (a rank's own failure before the "peer left" ones
    it caused).  Results of process worlds come back through JSON.
    """
    if backend in _IN_PROCESS:
        return run_threads(backend, size, fn, timeout=timeout, op_timeout=op_timeout)
    return _run_processes(backend, size, fn, timeout, op_timeout)


def run_threads(
    backend: str,
    size: int,
    fn: Callable[[Communicator], T],
    *,
    timeout: float = 120.0,
    op_timeout: float | None = None,
    close: bool = True,
    **init_kwargs: Any,
) -> list[T]:
    """:func:`run_spmd` for an in-process backend: one thread per rank, in a fresh world."""
    world = f"spmd-{uuid.uuid4().hex}"
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def rank_main(rank: int) -> None:
        comm = init(backend, rank=rank, size=size, world=world, timeout=op_timeout, **init_kwargs)
        try:
            results[rank] = fn(comm)
        except BaseException as err:
            errors[rank] = err
            comm.abort(f"rank {rank} raised {type(err).__name__}")
        finally:
            if close:
                comm.close()

    threads = [
        threading.Thread(target=rank_main, args=(r,), name=f"{backend}-rank-{r}", daemon=True)
        for r in range(size)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise CollectiveTimeoutError(
            f"{backend}: rank(s) {stuck} still running after {timeout} s", ranks=stuck
        )
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, err = _root_cause(failed)
        err.add_note(f"(raised on {backend} rank {rank} of {size})")
        raise err
    return results


def _root_cause(failed: list[tuple[int, BaseException]]) -> tuple[int, BaseException]:
    secondary = (ConnectionLostError, CommunicatorAbortedError)
    return sorted(failed, key=lambda item: isinstance(item[1], secondary))[0]


def _run_processes(
    backend: str,
    size: int,
    fn: Callable[[Communicator], Any],
    timeout: float,
    op_timeout: float | None,
) -> list[Any]:
    target = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in fn.__qualname__ or fn.__module__ == "__main__":
        raise InvalidArgumentError(
            f"run_spmd({backend!r}): {target} cannot be imported by the rank processes; pass a "
            "module-level function"
        )
    out = Path(tempfile.mkdtemp(prefix=f"spmd-{backend}-{size}-"))
    command = [sys.executable, "-m", "collectives.testing.spmd", "--fn", target, "--out", str(out)]
    if op_timeout is not None:
        command += ["--timeout", str(op_timeout)]
    path = os.pathsep.join(p for p in sys.path if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(
            launch_command(backend, size, command),
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise CollectiveTimeoutError(
            f"run_spmd({backend!r}): the world still ran after {timeout} s"
        ) from None
    reports = {}
    for rank in range(size):
        file = out / f"rank{rank}.json"
        if file.exists():
            reports[rank] = json.loads(file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    missing = [r for r in range(size) if r not in reports]
    if missing:
        raise AssertionError(
            f"run_spmd({backend!r}): rank(s) {missing} wrote no report (exit code "
            f"{proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    failed = [(r, _rebuild(rep)) for r, rep in sorted(reports.items()) if "error" in rep]
    if failed:
        rank, err = _root_cause(failed)
        err.add_note(f"(raised on {backend} rank {rank} of {size})\n{reports[rank]['traceback']}")
        raise err
    return [reports[r]["result"] for r in range(size)]


def _rebuild(report: dict[str, Any]) -> BaseException:
    """The library error a rank process reported, as its own type where that is ours."""
    cls = getattr(errors_module, report["error"], None)
    if isinstance(cls, type) and issubclass(cls, CollectivesError):
        return cls(report["message"])
    return AssertionError(f"{report['error']}: {report['message']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collectives.testing.spmd")
    parser.add_argument("--fn", required=True, help="MODULE:NAME of fn(comm)")
    parser.add_argument("--out", required=True, type=Path, help="folder for rank<N>.json")
    parser.add_argument("--backend", default=None, help="default: detected from the environment")
    parser.add_argument("--timeout", type=float, default=None, help="per-op timeout, seconds")
    args = parser.parse_args(argv)
    module, _, name = args.fn.partition(":")
    fn: Any = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    comm = init(args.backend, timeout=args.timeout)
    report: dict[str, Any]
    try:
        report = {"result": fn(comm)}
    except BaseException as err:
        report = {"error": type(err).__name__, "message": str(err)}
        report["traceback"] = traceback.format_exc()
    text = json.dumps(report, default=repr)
    (args.out / f"rank{comm.rank}.json").write_text(text)
    if "error" in report:
        comm.abort(report["error"])
        os._exit(1)  # a failed collective may leave the engine unable to shut down cleanly
    comm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
