"""Run the conformance suite in this process as one rank of a real multi-process world.

    mpiexec -n 3 python -m collectives.testing.runner --backend mpi --out DIR
    comfycluster-launch --nproc 3 --backend gloo -- python -m collectives.testing.runner --out DIR

Each rank writes ``DIR/rank<N>.json``: ``{"checks": {name: {"ok": bool, "error": str|null,
"seconds": float}}, "scenario": {...}}``.  Checks run in a fixed order on every rank; after the
first failure the rest are recorded as not run, because a failed collective can desynchronise
ranks.  ``--scenario NAME`` runs one destructive scenario instead; ``--device cuda`` runs the
device checks (:mod:`collectives.testing.device_checks`) on each rank's GPU instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collectives.communicator import Communicator
from collectives.testing.conformance import CHECKS, SCENARIOS
from collectives.testing.device_checks import DEVICE_CHECKS, bound, rank_device
from collectives.world import init

SCENARIO_CLOSE_S = 10.0
"""How long a rank that ran a scenario lets ``close()`` deliver its last messages."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collectives.testing.runner")
    parser.add_argument("--backend", default=None, help="default: detected from the environment")
    parser.add_argument("--out", required=True, type=Path, help="folder for rank<N>.json")
    parser.add_argument("--only", nargs="*", default=None, help="check names to run")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-op timeout, seconds")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="run the device checks with tensors on this device instead of the CPU suite",
    )
    args = parser.parse_args(argv)

    if args.scenario:
        # A launcher stops the other ranks (SIGTERM) as soon as one exits; the scenario is about
        # what the survivors see, so let them finish and write their report (the launcher still
        # SIGKILLs them after its grace period if they hang).  Before init: a rank may still be
        # forming the world when another is done with it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    comm = init(args.backend, timeout=args.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"rank": comm.rank, "size": comm.size, "backend": comm.backend}
    path = args.out / f"rank{comm.rank}.json"
    ok = True
    if args.scenario:
        # Written before the run too, so a rank that exits on purpose still leaves a record.
        report["scenario"] = {"name": args.scenario, "started": True}
        path.write_text(json.dumps(report))
        report["scenario"] = {"name": args.scenario, **SCENARIOS[args.scenario](comm, args.timeout)}
    else:
        report["checks"] = {}
        checks: dict[str, Callable[[Communicator], None]] = dict(CHECKS)
        if args.device:
            device = rank_device(args.device, int(os.environ.get("LOCAL_RANK", comm.rank)))
            report["device"] = str(device)
            checks = {name: bound(fn, device) for name, fn in DEVICE_CHECKS.items()}
        names = args.only or list(checks)
        for name in names:
            if not ok:
                report["checks"][name] = {"ok": False, "error": "not run: an earlier check failed"}
                continue
            start = time.monotonic()
            try:
                checks[name](comm)
                report["checks"][name] = {"ok": True, "error": None}
            except BaseException:
                ok = False
                report["checks"][name] = {"ok": False, "error": traceback.format_exc()}
            report["checks"][name]["seconds"] = round(time.monotonic() - start, 3)
    path.write_text(json.dumps(report, indent=1))
    sys.stdout.flush()
    if args.scenario:
        # A scenario leaves the world broken on purpose, so a clean shutdown could block on it:
        # close in a thread, bounded, then exit regardless.  Closing still matters: on a
        # transport that delivers eagerly posted messages from the process itself (udp), a rank
        # that exits at once takes its last messages with it, where a TCP engine's kernel would
        # still have sent them; close() lets them be acknowledged first (as MPI_Finalize would).
        closer = threading.Thread(target=comm.close, daemon=True)
        closer.start()
        closer.join(SCENARIO_CLOSE_S)
        os._exit(0)
    comm.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
