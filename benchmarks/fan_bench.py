"""Fan-out (scatter-like, from rank 0) and fan-in (gather-like, to rank 0) of large tensors.

The node pack's distribute/fan-in steps move 1-6 MB per rank this way.  Each repetition: an
optional idle gap (every rank sleeps: the "sleeping node" between prompts), a barrier, a scatter
of ``--mb`` MB to each rank (object API, as distribute), a barrier, a ``gatherv_into`` of ``--mb``
MB from each rank into slices of one fresh batch on rank 0 (as the fan-in).  Rank 0 times
both ops (when it has everything, the leader's view) and their CPU time; the udp backend's
counters (resends, probe timeouts, drops) and the kernel's UDP error counters
(``/proc/net/snmp``: ``RcvbufErrors``, ``InErrors``) are reported as deltas over the run.

    python -m benchmarks.fan_bench --ranks 4 --mb 6 --repeats 20 --idle 1.0 --backends udp,gloo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from collectives.communicator import Communicator
from collectives.testing.spmd import run_spmd

_ENV = "FAN_BENCH_ARGS"
_COUNTERS = (
    "retransmitted_segments",
    "lost_segments",
    "probe_timeouts",
    "window_full",
    "paced",
    "send_blocked",
    "wakeups",
)


def _kernel_udp() -> dict[str, int]:
    """The kernel's ``Udp:`` counters (Linux), for drops the socket saw before we read."""
    try:
        with open("/proc/net/snmp", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=False)}


def _stats(comm: Communicator) -> dict[str, int]:
    return {k: int(v) for k, v in comm.stats().items() if isinstance(v, int)}


def fan_rank(comm: Communicator) -> dict[str, Any]:
    """The SPMD body (module level: the rank processes import it by name)."""
    args = json.loads(os.environ[_ENV])
    if not args.get("profile"):
        return _fan(comm, args)
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(_fan, comm, args)
    finally:
        prof.dump_stats(os.path.join(args["profile"], f"rank{comm.rank}.prof"))


def _fan(comm: Communicator, args: dict[str, Any]) -> dict[str, Any]:
    import torch

    n = int(args["mb"] * (1 << 20)) // 4
    mine = torch.full((n,), float(comm.rank))
    items = [torch.full((n,), float(r)) for r in range(comm.size)] if comm.rank == 0 else None
    out: dict[str, list[float]] = {"fan_out": [], "fan_in": [], "cpu_out": [], "cpu_in": []}
    comm.scatter(items)  # warm-up: sessions up, buffers allocated
    comm.gatherv_into([torch.empty(n) for _ in range(comm.size)] if comm.rank == 0 else None, mine)
    stats0 = _stats(comm)
    kernel0 = _kernel_udp()
    for rep in range(args["repeats"]):
        if args["idle"] > 0 and rep % 2 == 1:  # alternate back-to-back and after-idle
            time.sleep(args["idle"])
        comm.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        got = comm.scatter(items)
        t1, c1 = time.perf_counter(), time.process_time()
        assert float(got[0]) == comm.rank and got.numel() == n
        comm.barrier()
        t2, c2 = time.perf_counter(), time.process_time()
        # As the node pack's fan-in: into slices of one fresh batch on the leader.
        batch = torch.empty(comm.size, n) if comm.rank == 0 else None
        comm.gatherv_into(list(batch) if batch is not None else None, mine)
        t3, c3 = time.perf_counter(), time.process_time()
        if batch is not None:
            assert batch[:, -1].tolist() == [float(r) for r in range(comm.size)]
        out["fan_out"].append(t1 - t0)
        out["fan_in"].append(t3 - t2)
        out["cpu_out"].append(c1 - c0)
        out["cpu_in"].append(c3 - c2)
        if comm.rank == 0 and rep % 5 == 4:
            print(f"  rep {rep + 1}/{args['repeats']}", file=sys.stderr, flush=True)
    stats1 = _stats(comm)
    kernel1 = _kernel_udp()
    names = [*_COUNTERS, *(k for k in stats1 if k.startswith("dropped_"))]
    counters = {k: stats1[k] - stats0.get(k, 0) for k in names if k in stats1}
    counters = {k: v for k, v in counters.items() if v or not k.startswith("dropped_")}
    gauges = ("srtt_us_max", "rttvar_us_max", "cwnd_max")  # now, not deltas
    counters.update({k: stats1[k] for k in gauges if k in stats1})
    kernel = {
        k: kernel1[k] - kernel0.get(k, 0) for k in ("RcvbufErrors", "InErrors") if k in kernel1
    }
    return {"times": out, "counters": counters, "kernel": kernel}


def _summary(values: list[float]) -> str:
    ms = sorted(v * 1e3 for v in values)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return f"p50 {statistics.median(ms):7.1f}  p90 {p90:7.1f}  max {ms[-1]:7.1f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--mb", type=float, default=6.0, help="MB per rank")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--idle", type=float, default=1.0, help="s of sleep before odd reps")
    parser.add_argument("--backends", default="udp,gloo")
    parser.add_argument("--profile", default="", help="write each rank's cProfile here")
    args = parser.parse_args(argv)
    os.environ[_ENV] = json.dumps(vars(args))
    for backend in args.backends.split(","):
        print(f"{backend}: {args.ranks} ranks, {args.mb} MB per rank, {args.repeats} reps",
              file=sys.stderr, flush=True)  # fmt: skip
        # By its import name: the rank processes cannot import ``__main__``'s function.
        from benchmarks.fan_bench import fan_rank as body

        results = run_spmd(backend, args.ranks, body, timeout=600.0, op_timeout=60.0)
        lead = results[0]
        times = lead["times"]
        for op in ("fan_out", "fan_in"):
            busy = times[op][0::2] if args.idle > 0 else times[op]
            idle = times[op][1::2] if args.idle > 0 else []
            cpu = times["cpu_" + op.split("_")[1]]
            line = f"{backend:5} {op:7} back-to-back {_summary(busy)}"
            if idle:
                line += f" | after idle {_summary(idle)}"
            line += f" | leader cpu p50 {statistics.median(cpu) * 1e3:.1f} ms"
            print(line, flush=True)
        for rank, res in enumerate(results):
            if res["counters"] or res["kernel"]:
                print(f"      rank {rank}: {res['counters']} kernel {res['kernel']}", flush=True)


if __name__ == "__main__":
    main()
