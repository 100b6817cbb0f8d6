"""Across worlds: each backend's time as a ratio of the references, per op, N and size.

References: raw gloo (``torch.distributed``, timed in the gloo world), raw MPI (mpi4py's buffer
API, in the mpi world), and plain TCP / UDP sockets moving the same bytes (timed in the *same*
world as the backend, in alternation with it).  The socket ratios are the steadier ones: the
gloo/MPI ratios compare worlds run one after another, so the machine's drift between them is in
the figure; ``vs_*_tcp_normalised`` divides it out through the raw TCP each world timed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._units import format_seconds, format_size

# reference name -> column label
REFERENCES = {
    "gloo": "vs gloo",
    "mpi": "vs MPI",
    "raw-tcp": "vs raw TCP",
    "raw-udp": "vs raw UDP",
}


def _key(row: dict[str, Any]) -> tuple[int, str, int]:
    return (int(row["world"]), str(row["op"]), int(row["size"]))


def compare(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per in-place row: ours, each reference's time and ours / reference."""
    mine = [r for r in rows if r["api"] == "inplace"]
    engine_rows = {(r["backend"], *_key(r)): r for r in mine if r["backend"] in ("gloo", "mpi")}
    out: list[dict[str, Any]] = []
    for row in mine:
        refs: dict[str, float | None] = {}
        tcp_here = row.get("baseline_s", {}).get("raw-tcp")
        normalised: dict[str, float | None] = {}
        for engine in ("gloo", "mpi"):
            other = engine_rows.get((engine, *_key(row)))
            refs[engine] = other["raw_s"] if other else None
            tcp_there = other.get("baseline_s", {}).get("raw-tcp") if other else None
            normalised[engine] = (
                (row["ours_s"] / tcp_here) / (other["raw_s"] / tcp_there)
                if other and tcp_here and tcp_there and other["raw_s"]
                else None
            )
        for name in ("raw-tcp", "raw-udp"):
            refs[name] = row.get("baseline_s", {}).get(name)
        out.append(
            {
                "backend": row["backend"],
                "world": row["world"],
                "op": row["op"],
                "size": row["size"],
                "ours_s": row["ours_s"],
                "reference_s": refs,
                "ratio": {name: (row["ours_s"] / t if t else None) for name, t in refs.items()},
                "ratio_tcp_normalised": normalised,
            }
        )
    return out


def comparison_table(entries: Sequence[dict[str, Any]], ops: Sequence[str], backend: str) -> str:
    """``backend``: ours and ours / each reference (the reference's own time in brackets)."""
    lines = [
        f"{backend} (ours, in-place) against the references: ratio = ours / reference "
        "(reference time in brackets; < 1 is faster)",
        "",
        "| op | N | size | ours | " + " | ".join(REFERENCES.values()) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(REFERENCES),
    ]
    order = {op: i for i, op in enumerate(ops)}
    for e in sorted(
        (e for e in entries if e["backend"] == backend),
        key=lambda e: (order.get(e["op"], len(order)), e["world"], e["size"]),
    ):
        cells = []
        for name in REFERENCES:
            ratio, ref = e["ratio"].get(name), e["reference_s"].get(name)
            if ratio is None or ref is None or not math.isfinite(ratio):
                cells.append("-")
            elif name == backend:
                cells.append(f"{ratio:.2f}x (own raw)")
            else:
                cells.append(f"{ratio:.2f}x ({format_seconds(ref)})")
        lines.append(
            f"| {e['op']} | {e['world']} | {format_size(e['size'])} | "
            f"{format_seconds(e['ours_s'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def plot_ratios(
    entries: Sequence[dict[str, Any]], ops: Sequence[str], subject: str, path: Path, title: str
) -> bool:
    """One panel per op: ``subject``'s ratio to each reference against size, a line per
    (reference, N); the 1x line marks parity.  False when there was nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [e for e in entries if e["backend"] == subject and e["size"] > 0]
    sized = [op for op in ops if any(e["op"] == op for e in mine)]
    if not sized:
        return False
    cols = min(3, len(sized))
    nrows = math.ceil(len(sized) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    worlds = sorted({e["world"] for e in mine})
    styles = ["-", "--", ":", "-."]
    drawn = 0
    for ax, op in zip(axes.flat, sized, strict=False):
        for ci, name in enumerate(REFERENCES):
            if name == subject:
                continue
            for wi, world in enumerate(worlds):
                series = sorted(
                    (e for e in mine if e["op"] == op and e["world"] == world),
                    key=lambda e: e["size"],
                )
                points = [(e["size"], e["ratio"].get(name)) for e in series]
                points = [(x, y) for x, y in points if y]
                if not points:
                    continue
                ax.plot(
                    [x for x, _ in points],
                    [y for _, y in points],
                    styles[wi % len(styles)],
                    marker="o",
                    color=colors[ci % len(colors)],
                    label=f"{REFERENCES[name]} N={world}",
                )
                drawn += 1
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{subject} {op}")
        ax.set_xlabel("per-rank tensor size")
        ax.set_ylabel("ours / reference")
        ticks = sorted({e["size"] for e in mine if e["op"] == op})
        ax.set_xticks(ticks, [format_size(t) for t in ticks])
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not drawn:  # no reference measured (a local world alone): no plot, rather than axes
        plt.close(fig)
        return False
    for ax in list(axes.flat)[len(sized) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
