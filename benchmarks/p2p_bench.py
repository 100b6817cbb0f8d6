"""``python -m benchmarks p2p``: point-to-point goodput, rank 0 to rank 1, against plain sockets.

    python -m benchmarks p2p --backend udp,gloo,raw-tcp,raw-udp --sizes 1M,16M,128M
    python -m benchmarks p2p --backend udp,gloo --mtu 1200     # udp in WAN mode (1200 B datagrams)

Two ranks per backend world; in each, our ``send_buffer``/``recv_into``, the engine's own
send/recv (torch.distributed for gloo, mpi4py ``Send``/``Recv`` for mpi, plain TCP for udp) and
the plain-socket baselines (raw-tcp, raw-udp: any named in ``--backend`` or ``--baselines``) are
timed in alternation on the same buffer, a barrier before each.  Goodput = bytes / the busiest
rank's median time (the receiver's: it is done last).  Same JSON schema as ``collectives``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._compare import compare, comparison_table
from benchmarks._rawnet import SEGMENT
from benchmarks._report import document, machine_info, rows_of
from benchmarks._units import format_seconds, format_size
from benchmarks._worker import WorkerSpec
from benchmarks.collectives_bench import (
    BACKENDS,
    RESULTS,
    _choices,
    _finite,
    _iters,
    _sizes,
    add_socket_options,
    plan_worlds,
    run_all,
    world_env,
)

OPS = ["p2p"]
DEFAULT_BACKENDS = "udp,gloo,raw-tcp,raw-udp"
DEFAULT_SIZES = "1M,16M,128M"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks p2p",
        description="Goodput of one message from rank 0 to rank 1: ours, the engine's own "
        "send/recv and plain TCP/UDP sockets, timed in alternation in the same two processes.",
    )
    parser.add_argument(
        "--backend",
        default=_choices(DEFAULT_BACKENDS, BACKENDS, "backend"),
        type=lambda s: _choices(s, [b for b in BACKENDS if b != "local"], "backend"),
        help=f"udp, gloo, mpi; raw-tcp/raw-udp add baselines (default: {DEFAULT_BACKENDS})",
    )
    add_socket_options(parser, default_baselines="")
    parser.add_argument("--sizes", default=_sizes(DEFAULT_SIZES), type=_sizes)
    parser.add_argument("--iters", default=None, type=_iters, metavar="auto|N")
    parser.add_argument("--cell-seconds", default=0.5, type=float, metavar="S")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--png", type=Path, metavar="PATH")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--op-timeout", default=300.0, type=float, metavar="S")
    parser.add_argument("--timeout", default=1800.0, type=float, metavar="S")
    return parser


def goodput_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "p2p goodput, rank 0 -> rank 1 (GB/s = size / busiest rank's median; "
        "the raw columns were timed in the same two processes)",
        "",
        "| backend | size | ours | ours GB/s | raw engine GB/s | raw TCP GB/s | raw UDP GB/s "
        "| ours / raw TCP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["backend"], r["size"])):
        base = r.get("baseline_agg_gbps", {})
        vs_tcp = r.get("ratio_vs_baseline", {}).get("raw-tcp")
        lines.append(
            f"| {r['backend']} | {r['size_label']} | {format_seconds(r['ours_s'])} "
            f"| {_gb(r['ours_gbps'])} | {_gb(r['raw_gbps'])} | {_gb(base.get('raw-tcp'))} "
            f"| {_gb(base.get('raw-udp'))} | {'-' if vs_tcp is None else f'{vs_tcp:.2f}x'} |"
        )
    return "\n".join(lines)


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_goodput(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['backend']} (ours)", []).append((r["size"], r["ours_gbps"]))
        series.setdefault(f"{r['backend']} raw engine", []).append((r["size"], r["raw_gbps"]))
        for name, gbps in r.get("baseline_agg_gbps", {}).items():
            series.setdefault(f"{name} (in {r['backend']} world)", []).append((r["size"], gbps))
    for label, raw_points in sorted(series.items()):
        points = sorted((x, y) for x, y in raw_points if y)
        if points:
            style = "--" if label.startswith("raw-") else "-"
            ax.plot([x for x, _ in points], [y for _, y in points], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["size"] for r in rows})
    ax.set_xticks(ticks, [format_size(t) for t in ticks])
    ax.set_xlabel("message size")
    ax.set_ylabel("goodput GB/s (busiest rank, median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    started = datetime.datetime.now().astimezone()
    clock = time.monotonic()
    machine = machine_info()
    backends, baselines = plan_worlds(args.backend, args.baselines)
    settings: dict[str, Any] = {
        "backends": backends,
        "baselines": baselines,
        "mtu": args.mtu,
        "raw_udp_segment": args.mtu or SEGMENT,
        "worlds": [2],
        "sizes": args.sizes,
        "ops": OPS,
        "apis": ["inplace"],
        "iters": "auto" if args.iters is None else args.iters,
        "cell_seconds": args.cell_seconds,
    }

    def make_spec(backend: str) -> WorkerSpec:
        return WorkerSpec(
            backend=backend,
            ops=OPS,
            sizes=args.sizes,
            apis=["inplace"],
            iters=args.iters,
            cell_seconds=args.cell_seconds,
            op_timeout=args.op_timeout,
            baselines=baselines,
            segment=args.mtu or SEGMENT,
            env=world_env(backend, args.mtu),
        )

    runs = run_all(backends, [2], make_spec, args.timeout)
    rows = [row for run in runs for row in rows_of(run)]
    seconds = time.monotonic() - clock
    print(goodput_table(rows))
    print()
    entries = compare(rows)
    for backend in backends:
        if any(e["backend"] == backend for e in entries):
            print(comparison_table(entries, OPS, backend))
            print()
    print(f"runtime {seconds:.1f} s")

    json_path = args.json or RESULTS / f"p2p-{started:%Y%m%d-%H%M%S}.json"
    doc = document(["p2p", *args_list], settings, runs, rows, started, seconds, machine)
    doc["comparison"] = entries
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(doc), indent=1))
    print(f"wrote {json_path}")
    if not args.no_png and rows:
        png_path = args.png or json_path.with_suffix(".png")
        mtu = f", MTU {args.mtu}" if args.mtu else ""
        plot_goodput(rows, png_path, f"p2p goodput: {', '.join(backends)}{mtu}")
        print(f"wrote {png_path}")
    return 0 if all(run.error is None for run in runs) else 1


__all__ = ["build_parser", "main"]
