"""The PNG: time against size, one panel per op; ours solid, raw dashed, ratios written on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._units import format_size


def plot(rows: Sequence[dict[str, Any]], ops: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [op for op in ops if any(r["op"] == op and r["size"] > 0 for r in rows)]
    if not sized:
        return
    cols = min(3, len(sized))
    nrows = math.ceil(len(sized) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    worlds = sorted({(r["backend"], r["world"]) for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {w: colors[i % len(colors)] for i, w in enumerate(worlds)}

    for ax, op in zip(axes.flat, sized, strict=False):
        for world in worlds:
            mine = [r for r in rows if r["op"] == op and (r["backend"], r["world"]) == world]
            color, name = color_of[world], f"{world[0]} N={world[1]}"
            for api, marker in (("inplace", "o"), ("object", "s")):
                series = sorted((r for r in mine if r["api"] == api), key=lambda r: r["size"])
                if not series:
                    continue
                xs = [r["size"] for r in series]
                suffix = "" if api == "inplace" else " object"
                ax.plot(
                    xs,
                    [r["ours_s"] for r in series],
                    "-",
                    marker=marker,
                    color=color,
                    alpha=1.0 if api == "inplace" else 0.6,
                    label=f"ours {name}{suffix}",
                )
                for r in series:
                    if r["ratio"] is not None:
                        ax.annotate(
                            f"{r['ratio']:.2f}x",
                            (r["size"], r["ours_s"]),
                            textcoords="offset points",
                            xytext=(4, 4 if api == "inplace" else -10),
                            fontsize=7,
                            color=color,
                        )
                if api == "inplace" or not any(r["api"] == "inplace" for r in mine):
                    ax.plot(
                        xs,
                        [r["raw_s"] for r in series],
                        "--",
                        marker="x",
                        color=color,
                        label=f"raw {name}",
                    )
        ax.set_xscale("log", base=2)
        ax.margins(x=0.12)  # room for the ratio labels of the end points
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("per-rank tensor size")
        ax.set_ylabel("seconds (busiest rank, median)")
        ticks = sorted({r["size"] for r in rows if r["op"] == op})
        ax.set_xticks(ticks, [format_size(t) for t in ticks])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(sized) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
