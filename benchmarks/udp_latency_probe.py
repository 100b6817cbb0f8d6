"""A scratch probe of the udp driver's latency and throughput, side by side with gloo.

``python -m benchmarks.udp_latency_probe [--backends udp,gloo] [--world 2] [--profile DIR]``
starts ``--world`` rank processes per backend (env rendezvous on loopback), and prints per op
the median and best per-iteration time of the slowest rank, and its median CPU time per
iteration (all threads of the rank: what to compare on a shared, busy machine, where wall time
measures the neighbours too).  ``--stats`` prints rank 0's udp counters and every rank's
datagrams, reads and turns per iteration.  ``--profile DIR`` writes one
cProfile file per rank and backend (``DIR/BACKEND-RANK.prof``), to see where a rank's time goes.
Not a benchmark of record (see ``python -m benchmarks collectives``): a quick before/after tool.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

KIB = 1024
MIB = 1024 * KIB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ops(small_iters: int, big_iters: int) -> list[tuple[str, str, int, int]]:
    # (label, kind, bytes, iterations)
    return [
        ("pingpong 1K (one way)", "pingpong", KIB, small_iters),
        ("broadcast 1K", "bcast", KIB, small_iters),
        ("allgather 1K", "allgather", KIB, small_iters),
        ("allreduce 1K", "allreduce", KIB, small_iters),
        ("broadcast 64K", "bcast", 64 * KIB, small_iters // 2),
        ("broadcast 1M", "bcast", MIB, max(big_iters * 4, 10)),
        ("broadcast 16M", "bcast", 16 * MIB, big_iters),
        ("broadcast 128M", "bcast", 128 * MIB, max(big_iters // 4, 3)),
    ]


def _rank_main(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from collectives.world import init

    if args.pin:
        # One CPU per rank: tells scheduler placement (a loopback wakeup pulling the peer onto
        # the sender's CPU) apart from the transport's own cost.
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(os.environ["RANK"]) % len(cpus)]})
    io_profiler = None
    if args.profile and args.backend == "udp":
        io_profiler = _profile_io_thread()
    comm = init(args.backend, timeout=60.0)
    rank, size = comm.rank, comm.size
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    results: dict[str, list[float]] = {}
    wanted = set(args.only.split(",")) if args.only else None
    for label, kind, nbytes, iters in _ops(args.small_iters, args.big_iters):
        if wanted is not None and kind + str(nbytes) not in wanted and label not in wanted:
            continue
        # numpy-backed: fresh torch tensors page-fault on first touch (see BASELINE.md).
        buf = torch.from_numpy(np.full(nbytes, rank + 1, dtype=np.uint8))
        out = torch.from_numpy(np.zeros(size * nbytes, dtype=np.uint8))
        fbuf = torch.from_numpy(np.full(nbytes // 4, rank + 1, dtype=np.float32))
        times: list[float] = []
        cpu: list[float] = []
        warm = 3 if nbytes >= 16 * MIB else 20
        comm.barrier()
        if profiler is not None:
            profiler.enable()
        for i in range(warm + iters):
            t0, c0 = time.perf_counter(), time.process_time()
            if kind == "bcast":
                comm.broadcast_into(buf, root=0)
            elif kind == "allgather":
                comm.allgather_into(out, buf)
            elif kind == "allreduce":
                comm.allreduce(fbuf)
            else:  # ping-pong between ranks 0 and 1; the rest idle
                if rank == 0:
                    comm.send_buffer(buf, 1)
                    comm.recv_into(buf, 1)
                elif rank == 1:
                    comm.recv_into(buf, 0)
                    comm.send_buffer(buf, 0)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if kind == "pingpong":
                dt, dc = dt / 2, dc / 2
            if i >= warm:
                times.append(dt)
                cpu.append(dc)
        if profiler is not None:
            profiler.disable()
        comm.barrier()
        results[label] = times
        results[label + " cpu"] = cpu
    if profiler is not None:
        os.makedirs(args.profile, exist_ok=True)
        profiler.dump_stats(os.path.join(args.profile, f"{args.backend}-{rank}.prof"))
    stats = comm.stats() if args.backend == "udp" else {}
    everyone = comm.allgather(results)
    all_stats = comm.allgather(stats)
    comm.close()
    if io_profiler is not None:
        io_profiler.dump_stats(os.path.join(args.profile, f"{args.backend}-{rank}-io.prof"))
    if rank == 0:
        print(json.dumps({"results": everyone, "stats": all_stats}))


def _profile_io_thread() -> Any:
    """Wrap the udp IO thread's loop in a cProfile (cProfile sees one thread only)."""
    import cProfile

    from collectives.backends import udp_io

    prof = cProfile.Profile()
    run = udp_io.Engine._run

    def profiled(self: Any) -> None:
        prof.runcall(run, self)

    udp_io.Engine._run = profiled  # type: ignore[method-assign]
    return prof


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:7.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:7.2f} ms"
    return f"{seconds:7.2f} s "


def _run_backend(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    port = _free_port()
    procs = []
    for rank in range(args.world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank), WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        )  # fmt: skip
        cmd = [sys.executable, "-m", "benchmarks.udp_latency_probe", "--rank-main",
               "--backend", backend, "--small-iters", str(args.small_iters),
               "--big-iters", str(args.big_iters)]  # fmt: skip
        if args.profile:
            cmd += ["--profile", args.profile]
        if args.only:
            cmd += ["--only", args.only]
        if args.pin:
            cmd += ["--pin"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{backend}: a rank failed: {[p.returncode for p in procs]}")
    return dict(json.loads(outs[0].strip().splitlines()[-1]))


# Counters worth reading per iteration (what a small op costs each rank).
_PER_OP = (
    "datagrams_out", "datagrams_in", "frames_sealed", "reads", "caller_turns", "io_turns",
    "wakeups", "send_blocked",
)  # fmt: skip


def _print_stats(backend: str, stats: list[dict[str, Any]], results: dict[str, Any]) -> None:
    """Every rank's udp counters: in full for rank 0, and the per-op ones divided by the
    iterations run (warm-up included, barriers too: a rough count of what one op costs)."""
    print(backend, "rank 0", json.dumps(stats[0]))
    iters = sum(len(v) for k, v in results.items() if not k.endswith(" cpu")) or 1
    for rank, counters in enumerate(stats):
        per = {k: round(counters[k] / iters, 2) for k in _PER_OP if k in counters}
        print(f"{backend} rank {rank} per iteration: {per}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="udp,gloo")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--small-iters", type=int, default=300)
    ap.add_argument("--big-iters", type=int, default=8)
    ap.add_argument("--only", default="", help="labels or KINDBYTES, comma-separated")
    ap.add_argument("--profile", default="")
    ap.add_argument("--pin", action="store_true", help="pin rank r to CPU r mod #CPUs")
    ap.add_argument("--stats", action="store_true", help="print the udp counters")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="udp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_main:
        _rank_main(args)
        return 0
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    for backend in args.backends.split(","):
        got = _run_backend(args, backend)
        for label in got["results"][0]:
            if label.endswith(" cpu"):
                continue
            per_iter = [max(t) for t in zip(*(r[label] for r in got["results"]), strict=True)]
            cpus = (r[label + " cpu"] for r in got["results"])
            per_cpu = [max(t) for t in zip(*cpus, strict=True)]
            table.setdefault(label, {})[backend] = (
                statistics.median(per_iter),
                min(per_iter),
                statistics.median(per_cpu),
            )
        if args.stats and any(got["stats"]):
            _print_stats(backend, got["stats"], got["results"][0])
    backends = args.backends.split(",")
    width = 40
    print(f"{'op (world ' + str(args.world) + ')':24}" + "".join(f"{b:>{width}}" for b in backends))
    for label, row in table.items():
        cells = []
        for b in backends:
            if b in row:
                med, best, cpu = row[b]
                cell = f"{_fmt(med)} (best {_fmt(best).strip()}, CPU {_fmt(cpu).strip()})"
                cells.append(cell.rjust(width))
            else:
                cells.append(" " * width)
        print(f"{label:24}" + "".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
