"""One rank of a benchmark world: time every (op, size) cell, ours against the raw engine.

Started by ``python -m benchmarks collectives`` (never by hand, though it can be):

    mpiexec -n N python -m benchmarks._worker SPEC.json
    comfycluster-launch --nproc N --backend gloo -- python -m benchmarks._worker SPEC.json

``SPEC.json`` is a :class:`WorkerSpec`; each rank writes ``<out>/rank<R>.json``.  Rank 0 appends
one line per cell to ``<out>/progress`` so the parent can show where the run is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks._engines import LocalShared, RawEngine, raw_engine
from benchmarks._ops import OPS, Call, check_results, make_buffers, ours_inplace, ours_object
from benchmarks._rawnet import SEGMENT
from benchmarks._timing import TimingPlan, time_interleaved
from benchmarks._units import format_size

if TYPE_CHECKING:
    from collectives import Communicator

Progress = Callable[[int, int, str], None]  # (cells done + 1, cells, label)

OURS, OURS_OBJECT, RAW = "ours", "ours_object", "raw"


@dataclass(frozen=True)
class WorkerSpec:
    backend: str
    ops: list[str]
    sizes: list[int]
    apis: list[str]  # "inplace", "object"
    iters: int | None
    cell_seconds: float
    op_timeout: float
    out: str = ""
    # Plain-socket engines timed as extra variants next to ours (``_raw_sockets.BASELINES``).
    baselines: list[str] = field(default_factory=list)
    segment: int = SEGMENT  # raw-udp datagram payload
    # Set in the ranks' environment before they start (COMFY_CLUSTER_UDP_MTU for --mtu).
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> WorkerSpec:
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    def cells(self) -> list[tuple[str, int]]:
        """(op, size) in run order; ops without a payload run once, with size 0."""
        return [(op, size) for op in self.ops for size in (self.sizes if OPS[op].sized else [0])]


def variants(
    comm: Communicator,
    engine: RawEngine,
    op: str,
    nbytes: int,
    apis: list[str],
    baselines: dict[str, RawEngine] | None = None,
) -> tuple[dict[str, Call], Any]:
    """The calls to time for one cell, keyed by variant, plus the buffers they keep alive.

    Baselines share the buffers too; they run after ``check_results`` zeroed them, and what they
    leave behind is never read."""
    spec = OPS[op]
    buffers = make_buffers(spec, nbytes, comm.rank, comm.size)
    calls: dict[str, Call] = {}
    if "inplace" in apis or not spec.object_api:
        calls[OURS] = ours_inplace(comm, op, buffers)
    if "object" in apis and spec.object_api:
        calls[OURS_OBJECT] = ours_object(comm, op, buffers)
    calls[RAW] = engine.prepare(op, buffers)
    for name, baseline in (baselines or {}).items():
        calls[name] = baseline.prepare(op, buffers)
    check_results(comm, op, buffers, apis)
    return calls, buffers


def run_rank(
    comm: Communicator,
    engine: RawEngine,
    spec: WorkerSpec,
    progress: Progress | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    baselines: dict[str, RawEngine] | None = None,
) -> dict[str, Any]:
    """Time every cell of ``spec`` on this rank; the rank's report (see ``_report``).

    ``checkpoint`` gets the report so far after every cell, so a world stopped by its timeout
    still leaves the cells it finished.
    """
    plan = TimingPlan(iters=spec.iters, cell_seconds=spec.cell_seconds)
    cells = spec.cells()
    report: dict[str, Any] = {
        "rank": comm.rank,
        "size": comm.size,
        "backend": comm.backend,
        "engine": engine.info(),
        "baselines": {name: b.info() for name, b in (baselines or {}).items()},
        # Engine settings our backend chose (MPICH algorithms, see mpi_tuning): the raw calls
        # run in the same process, so a reader must know what differs between the two.
        "tuning": dict(getattr(comm.engine, "tuning", {})),
        # How large broadcasts move (see mpi_placement): a choice of ours, not an MPICH setting.
        "broadcast_plan": getattr(comm.engine, "broadcast_plan", None),
        "versions": versions(comm.backend) if comm.rank == 0 else {},
        "cells": [],
        "error": None,
    }
    started = time.monotonic()
    for index, (op, nbytes) in enumerate(cells):
        if progress is not None and comm.rank == 0:
            progress(index + 1, len(cells), f"{op} {format_size(nbytes)}")
        try:
            calls, buffers = variants(comm, engine, op, nbytes, spec.apis, baselines)
            times = time_interleaved(calls, engine.barrier, engine.agree_max, plan, nbytes)
            del calls, buffers
        except Exception:
            report["error"] = {"op": op, "size": nbytes, "traceback": traceback.format_exc()}
            break
        report["cells"].append(
            {
                "op": op,
                "size": nbytes,
                "reps": times.reps,
                "warmup": times.warmup,
                "samples": times.samples,
            }
        )
        report["seconds"] = time.monotonic() - started
        if checkpoint is not None:
            checkpoint(report)
    report["seconds"] = time.monotonic() - started
    return report


def versions(backend: str) -> dict[str, str]:
    import numpy
    import torch

    import collectives

    found = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "collectives": collectives.__version__,
    }
    if backend == "mpi":
        import mpi4py
        from mpi4py import MPI

        found["mpi4py"] = mpi4py.__version__
        found["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
    return found


def run_local_world(spec: WorkerSpec, size: int, progress: Progress | None) -> list[dict[str, Any]]:
    """The ``local`` backend: ``size`` ranks as threads of this process."""
    from collectives.testing import run_local

    shared = LocalShared(size)

    def rank_main(comm: Communicator) -> dict[str, Any]:
        return run_rank(comm, raw_engine(comm, shared), spec, progress)

    return run_local(
        size, rank_main, timeout=max(600.0, spec.op_timeout * 4), op_timeout=spec.op_timeout
    )


def _file_progress(path: Path) -> Progress:
    def note(done: int, total: int, label: str) -> None:
        with path.open("a") as fh:
            fh.write(f"{done}\t{total}\t{label}\n")

    return note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._worker")
    parser.add_argument("spec", type=Path, help="WorkerSpec JSON written by the parent")
    args = parser.parse_args(argv)
    spec = WorkerSpec.load(args.spec)
    out = Path(spec.out)

    import collectives

    comm = collectives.init(spec.backend, timeout=spec.op_timeout)
    path = out / f"rank{comm.rank}.json"
    engine = raw_engine(comm)
    from benchmarks._raw_sockets import baseline_engines

    baselines = baseline_engines(comm, spec.baselines, engine, spec.segment)

    def save(report: dict[str, Any]) -> None:
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(report))
        partial.replace(path)  # the parent never reads half a file

    progress = _file_progress(out / "progress")
    report = run_rank(comm, engine, spec, progress, save, baselines)
    save(report)
    if report["error"] is not None:
        # The other ranks may be stuck in the collective this one left: exiting non-zero makes
        # mpiexec / the launcher stop them, where a clean close() could wait on them forever.
        sys.stderr.write(f"rank {comm.rank}: {report['error']['traceback']}")
        sys.stderr.flush()
        os._exit(1)
    comm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
