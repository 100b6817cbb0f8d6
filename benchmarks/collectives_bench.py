"""``python -m benchmarks collectives``: our collectives against the raw engine, side by side.

    python -m benchmarks collectives --backend gloo --world 2,4 --sizes 1M,16M
    python -m benchmarks collectives --backend mpi --world 2 --ops broadcast --sizes 128M
    python -m benchmarks collectives --backend udp,gloo,mpi --world 2,4 --sizes 1K,1M,128M

This process starts the world itself (``mpiexec`` for mpi, ``comfycluster-launch`` for gloo and
udp, threads for local).  In every rank and for every op x size, our call and the raw engine's
call (torch.distributed for gloo, mpi4py's buffer API for mpi, plain TCP sockets for udp, a
memcpy for local) are timed in alternation on the same buffers, and with them the plain-socket
baselines (``--baselines``: raw-tcp, raw-udp); see ``_timing`` for the method.  Prints a table
per backend, then each backend against gloo, MPI and the raw sockets; writes JSON with every
sample and PNGs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._compare import compare, comparison_table, plot_ratios
from benchmarks._launch import REPO, WorldRun, run_world
from benchmarks._ops import COLLECTIVE_OPS
from benchmarks._rawnet import SEGMENT
from benchmarks._report import BASELINES, document, machine_info, rows_of, table
from benchmarks._units import format_size, parse_sizes
from benchmarks._worker import Progress, WorkerSpec

WORLD_BACKENDS = ("udp", "gloo", "mpi", "local")
BACKENDS = WORLD_BACKENDS + BASELINES
HOST_BACKEND = "gloo"  # runs the baselines when only raw-* names were asked for
APIS = ("inplace", "object")
RAW_ENGINE = {
    "gloo": "torch.distributed gloo",
    "mpi": "mpi4py buffer API",
    "local": "memcpy",
    "udp": "plain TCP sockets (raw-tcp)",
}
DEFAULT_SIZES = "1K,64K,1M,16M,128M"
RESULTS = REPO / "benchmarks" / "results"
MTU_ENV = "COMFY_CLUSTER_UDP_MTU"


def _choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    picked = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [p for p in picked if p not in allowed]
    if unknown or not picked:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}: pick from {', '.join(allowed)}"
        )
    return picked


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks collectives",
        description="Time our collectives and the raw engine's in the same processes; print "
        "op | N | size | ours | raw | ratio | GB/s, write JSON (all samples) and a PNG.",
    )
    parser.add_argument(
        "--backend",
        required=True,
        type=lambda s: _choices(s, BACKENDS, "backend"),
        help="udp, gloo, mpi or local (comma list runs each); raw-tcp/raw-udp add baselines",
    )
    add_socket_options(parser, default_baselines=",".join(BASELINES))
    parser.add_argument(
        "--world",
        default=[2],
        type=_world_sizes,
        metavar="N[,N...]",
        help="ranks (comma list runs each; default: 2)",
    )
    parser.add_argument(
        "--sizes",
        default=parse_sizes(DEFAULT_SIZES),
        type=_sizes,
        help=f"per-rank float32 tensor bytes (default: {DEFAULT_SIZES})",
    )
    parser.add_argument(
        "--ops",
        default=list(COLLECTIVE_OPS),
        type=lambda s: _choices(s, COLLECTIVE_OPS, "op"),
        help=f"default: {','.join(COLLECTIVE_OPS)}",
    )
    parser.add_argument(
        "--api",
        default=list(APIS),
        type=lambda s: _choices(s, APIS, "api"),
        help="inplace (buffer API) and/or object (pickle-5 object API, for "
        "broadcast/scatter/gather/allgather); default: both",
    )
    parser.add_argument(
        "--iters",
        default=None,
        type=_iters,
        metavar="auto|N",
        help="timed repetitions per variant; auto (default) aims at --cell-seconds per cell",
    )
    parser.add_argument(
        "--cell-seconds",
        default=0.5,
        type=float,
        metavar="S",
        help="timed seconds per cell with --iters auto (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="default: benchmarks/results/collectives-<time>.json",
    )
    parser.add_argument("--png", type=Path, metavar="PATH", help="default: the JSON path, .png")
    parser.add_argument("--no-png", action="store_true", help="skip the plot")
    parser.add_argument(
        "--op-timeout",
        default=300.0,
        type=float,
        metavar="S",
        help="per-collective timeout inside the ranks (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        default=3600.0,
        type=float,
        metavar="S",
        help="stop a world that runs longer (default: %(default)s)",
    )
    return parser


def add_socket_options(parser: argparse.ArgumentParser, default_baselines: str) -> None:
    parser.add_argument(
        "--baselines",
        default=default_baselines,
        type=_baselines,
        metavar="raw-tcp,raw-udp|none",
        help="plain-socket engines timed next to ours in every world "
        f"(default: {default_baselines or 'none'}; not in the threaded local world)",
    )
    parser.add_argument(
        "--mtu",
        type=int,
        metavar="BYTES",
        help=f"datagram payload: the udp backend's ({MTU_ENV}; 1200 is its WAN mode) and "
        f"raw-udp's (default: the backend's own; raw-udp {SEGMENT})",
    )


def _baselines(text: str) -> list[str]:
    return [] if text in ("", "none") else _choices(text, BASELINES, "baseline")


def plan_worlds(backends: list[str], baselines: list[str]) -> tuple[list[str], list[str]]:
    """(world backends to run, baselines to time in them): raw-* names in ``--backend`` are
    baselines too, and a list of baselines alone runs in a gloo world."""
    picked = [b for b in backends if b in WORLD_BACKENDS]
    extra = [b for b in backends if b in BASELINES and b not in baselines]
    return (picked or [HOST_BACKEND]), [b for b in BASELINES if b in baselines + extra]


def run_all(
    backends: list[str],
    worlds: list[int],
    make_spec: Any,
    timeout: float,
) -> list[WorldRun]:
    """Every (backend, N) world in turn, with the progress line; failures reported, not fatal."""
    progress = _ProgressLine()
    runs: list[WorldRun] = []
    for backend in backends:
        spec: WorkerSpec = make_spec(backend)
        for size in worlds:
            run = run_world(spec, size, progress.world(backend, size), timeout)
            progress.done()
            runs.append(run)
            if run.error is not None:
                print(f"{backend} N={size} failed: {run.error}", file=sys.stderr)
            elif run.shutdown_error is not None:
                print(f"{backend} N={size}: warning: {run.shutdown_error}", file=sys.stderr)
    return runs


def world_env(backend: str, mtu: int | None) -> dict[str, str]:
    return {MTU_ENV: str(mtu)} if backend == "udp" and mtu is not None else {}


def _world_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--world wants integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--world wants rank counts >= 1, got {text!r}")
    return sizes


def _sizes(text: str) -> list[int]:
    try:
        sizes = parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes is empty")
    return sizes


def _iters(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--iters wants 'auto' or a positive count, got {text!r}")
    return int(text)


class _ProgressLine:
    """``[12/40] allgather 16M gloo N=2`` on stderr: rewritten in place on a terminal."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._width = 0

    def world(self, backend: str, size: int) -> Progress:
        def note(done: int, total: int, label: str) -> None:
            text = f"[{done}/{total}] {label} {backend} N={size} ..."
            if self._tty:
                sys.stderr.write("\r" + text.ljust(self._width))
                self._width = len(text)
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()

        return note

    def done(self) -> None:
        if self._tty and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    started = datetime.datetime.now().astimezone()
    clock = time.monotonic()
    machine = machine_info()  # load average before we add to it
    backends, baselines = plan_worlds(args.backend, args.baselines)
    settings: dict[str, Any] = {
        "backends": backends,
        "baselines": baselines,
        "mtu": args.mtu,
        "worlds": args.world,
        "sizes": args.sizes,
        "ops": args.ops,
        "apis": args.api,
        "iters": "auto" if args.iters is None else args.iters,
        "cell_seconds": args.cell_seconds,
    }

    def make_spec(backend: str) -> WorkerSpec:
        return WorkerSpec(
            backend=backend,
            ops=args.ops,
            sizes=args.sizes,
            apis=args.api,
            iters=args.iters,
            cell_seconds=args.cell_seconds,
            op_timeout=args.op_timeout,
            # Threads share one interpreter: sockets driven from them would measure the GIL.
            baselines=[] if backend == "local" else baselines,
            segment=args.mtu or SEGMENT,
            env=world_env(backend, args.mtu),
        )

    runs = run_all(backends, args.world, make_spec, args.timeout)

    if hasattr(os, "getloadavg"):
        machine["loadavg_at_end"] = list(os.getloadavg())
    rows = [row for run in runs for row in rows_of(run)]
    seconds = time.monotonic() - clock
    for backend in backends:
        mine = [r for r in rows if r["backend"] == backend]
        if mine:
            print(table(mine, args.ops, RAW_ENGINE[backend], backend))
            print()
    entries = compare(rows)
    for backend in backends:
        if any(e["backend"] == backend for e in entries):
            print(comparison_table(entries, args.ops, backend))
            print()
    for run in runs:
        first = run.reports[0] if run.reports else {}
        where = f"{run.backend} N={run.size}"
        if first.get("tuning"):
            chosen = ", ".join(f"{k}={v}" for k, v in sorted(first["tuning"].items()))
            print(f"{where}: ours set {chosen}; the raw blocking calls keep their defaults")
        if first.get("broadcast_plan") and run.size > 2:
            print(f"{where}: broadcasts of 1 MiB and more go as {first['broadcast_plan']}")
    print(f"runtime {seconds:.1f} s")

    json_path = args.json or RESULTS / f"collectives-{started:%Y%m%d-%H%M%S}.json"
    doc = document(["collectives", *args_list], settings, runs, rows, started, seconds, machine)
    doc["comparison"] = entries
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(doc), indent=1))
    print(f"wrote {json_path}")
    if not args.no_png and rows:
        from benchmarks._plot import plot

        png_path = args.png or json_path.with_suffix(".png")
        sizes = ", ".join(format_size(s) for s in args.sizes)
        title = f"ours (solid) vs raw (dashed): {', '.join(backends)}; sizes {sizes}"
        plot(rows, args.ops, png_path, title)
        print(f"wrote {png_path}")
        subject = "udp" if "udp" in backends else backends[0]
        ratio_path = png_path.with_name(png_path.stem + "-ratios.png")
        if plot_ratios(entries, args.ops, subject, ratio_path, f"{subject}: ours / reference"):
            print(f"wrote {ratio_path}")
    return 0 if all(run.error is None for run in runs) else 1


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


__all__ = ["build_parser", "main"]
