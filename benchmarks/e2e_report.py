"""The end-to-end benchmark's derived numbers, tables, JSON document and PNG.

Every derived number is a median over the timed repeats (the warm-up run is kept in the JSON but
never used).  Differences between a cluster and a plain variant are medians of per-repeat
differences: the two ran back to back, so a slow spell of this shared machine hits both.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks._report import package_versions
from benchmarks._timing import median
from benchmarks._units import format_seconds

if TYPE_CHECKING:
    from benchmarks.e2e_bench import ClusterRun

SCHEMA = "e2e-bench/1"
TARGET_EFFICIENCY = 0.95  # scaling workflow at 4 ranks
TARGET_PER_IMAGE_S = 0.005  # cluster overhead per 512x512 image on loopback
Row = dict[str, Any]


# --- derived numbers -------------------------------------------------------------------------


def _walls(entry: dict[str, Any] | None, key: str = "wall_s") -> list[float]:
    if not entry:
        return []
    return [float(s[key]) for s in entry["samples"] if s.get(key) is not None]


def _med(values: list[float]) -> float | None:
    return median(values) if values else None


def _paired(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """Median over repeats of a's time minus b's time in the same repeat."""
    if not a or not b:
        return None
    other = {s["repeat"]: s["wall_s"] for s in b["samples"]}
    deltas = [s["wall_s"] - other[s["repeat"]] for s in a["samples"] if s["repeat"] in other]
    return _med(deltas)


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def build_rows(runs: Sequence[ClusterRun], args: argparse.Namespace) -> dict[str, list[Row]]:
    """``{"scaling": [...], "overhead": [...], "ksampler": [...], "upstream": [...]}``, one row
    per cluster size."""
    ok = [run for run in runs if run.ok]
    image_bytes = args.size * args.size * 3 * 4
    out: dict[str, list[Row]] = {"scaling": [], "overhead": [], "ksampler": [], "upstream": []}

    scaling_t1 = _baseline(ok, "scaling", "cluster")
    ksampler_t1 = _baseline(ok, "ksampler", "cluster")
    upstream_t1 = _baseline(ok, "upstream", "cluster")
    for run in ok:
        n, res = run.ranks, run.results
        if "scaling" in res:
            entry = res["scaling"]["cluster"]
            wall = _med(_walls(entry))
            work = args.images * args.sleep_per_image
            ideal = work / n
            speedup = _div(scaling_t1, wall)
            # What one instance spends beside the sleep (SaveTensor, the prompt's bookkeeping) is
            # serial CPU work that more ranks do not divide: with it, even a cluster that added
            # nothing would reach only this efficiency.
            serial = None if scaling_t1 is None else max(0.0, scaling_t1 - work)
            ceiling = None if serial is None else _div(scaling_t1, n * (ideal + serial))
            out["scaling"].append(
                {
                    "ranks": n,
                    "images": args.images,
                    "sleep_per_image_s": args.sleep_per_image,
                    "ideal_s": ideal,
                    "wall_s": wall,
                    "server_s": _med(_walls(entry, "server_s")),
                    "speedup": speedup,
                    "efficiency": _div(speedup, n),
                    "ideal_over_wall": _div(ideal, wall),
                    "above_ideal_s": None if wall is None else wall - ideal,
                    "serial_s": serial,
                    "efficiency_ceiling": ceiling,
                }
            )
        if "transfer" in res:
            out["overhead"].append(_overhead_row(n, res, args, image_bytes))
        if "ksampler" in res:
            entry = res["ksampler"]["cluster"]
            wall = _med(_walls(entry))
            speedup = _div(ksampler_t1, wall)
            out["ksampler"].append(
                {
                    "ranks": n,
                    "images": args.images,
                    "steps": args.ksampler_steps,
                    "size": args.ksampler_size,
                    "threads_per_rank": run.threads_per_rank,
                    "wall_s": wall,
                    "server_s": _med(_walls(entry, "server_s")),
                    "speedup": speedup,
                    "efficiency": _div(speedup, n),
                }
            )
        if "upstream" in res:
            out["upstream"].append(_upstream_row(n, res["upstream"]["cluster"], upstream_t1, args))
    return out


def _upstream_row(n: int, entry: Any, t1: float | None, args: argparse.Namespace) -> Row:
    wall = _med(_walls(entry))
    work = args.images * args.sleep_per_image
    # What one instance spends beside the sleep (the generation, mostly) runs on the leader
    # only, whatever N: the ideal divides the sleep alone.
    serial = None if t1 is None else max(0.0, t1 - work)
    ideal = None if serial is None else serial + work / n
    return {
        "ranks": n,
        "images": args.images,
        "steps": args.ksampler_steps,
        "size": args.ksampler_size,
        "sleep_per_image_s": args.sleep_per_image,
        "wall_s": wall,
        "server_s": _med(_walls(entry, "server_s")),
        "serial_s": serial,
        "ideal_s": ideal,
        "speedup": _div(t1, wall),
        "ideal_over_wall": _div(ideal, wall),
    }


def _baseline(runs: Sequence[ClusterRun], key: str, variant: str) -> float | None:
    for run in runs:
        if run.ranks == 1 and key in run.results:
            return _med(_walls(run.results[key][variant]))
    return None


def _overhead_row(
    n: int, res: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace, image_bytes: int
) -> Row:
    few = res["transfer"]
    many = res.get("transfer_many")
    prompt = res.get("prompt", {})
    delta = _paired(few["cluster"], few["plain"])
    row: Row = {
        "ranks": n,
        "image_bytes": image_bytes,
        "images": args.images,
        "cluster_s": _med(_walls(few["cluster"])),
        "plain_s": _med(_walls(few["plain"])),
        "delta_s": delta,
        "per_image_s": _div(delta, args.images),
        "many_images": None,
        "many_cluster_s": None,
        "many_plain_s": None,
        "many_delta_s": None,
        "many_per_image_s": None,
        "slope_per_image_s": None,
        "intercept_s": None,
        "cluster_info_s": _med(_walls(prompt.get("cluster_info"))),
        "plain_min_s": _med(_walls(prompt.get("plain_min"))),
        "fixed_s": _paired(prompt.get("cluster_info"), prompt.get("plain_min")),
    }
    if many is not None:
        many_delta = _paired(many["cluster"], many["plain"])
        row.update(
            many_images=args.many_images,
            many_cluster_s=_med(_walls(many["cluster"])),
            many_plain_s=_med(_walls(many["plain"])),
            many_delta_s=many_delta,
            many_per_image_s=_div(many_delta, args.many_images),
        )
        if delta is not None and many_delta is not None:
            slope = (many_delta - delta) / (args.many_images - args.images)
            row["slope_per_image_s"] = slope
            row["intercept_s"] = delta - slope * args.images
    return row


# --- tables ----------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else format_seconds(value)


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * 1e3:.2f} ms"


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _table(title: str, columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A titled markdown table, every column right-aligned."""
    lines = [title, "", f"| {' | '.join(columns)} |", "|" + "---:|" * len(columns)]
    lines += [f"| {' | '.join(row)} |" for row in cells]
    return "\n".join(lines)


def tables(rows: dict[str, list[Row]], args: argparse.Namespace) -> str:
    """Markdown tables, one per measurement that has rows."""
    parts: list[str] = []
    if rows["scaling"]:
        title = (
            f"scaling: {args.images} images {args.size}x{args.size}, SleepPerImage "
            f"{args.sleep_per_image:g} s/image; ideal = images x sleep / N; "
            f"efficiency = T1 / (N x TN) (target >= {TARGET_EFFICIENCY} at N=4); ceiling = "
            "the efficiency of a cluster that added nothing, T1's part beside the sleep "
            "(serial, on the leader) not divided"
        )
        columns = ("N", "ideal", "wall", "above ideal", "speedup", "efficiency", "ceiling")
        cells = []
        for r in rows["scaling"]:
            low = r["ranks"] == 4 and r["efficiency"] is not None
            flag = " *" if low and r["efficiency"] < TARGET_EFFICIENCY else ""
            cells.append(
                (str(r["ranks"]), _s(r["ideal_s"]), _s(r["wall_s"]), _ms(r["above_ideal_s"]),
                 f"{_x(r['speedup'])}x", f"{_x(r['efficiency'], 3)}{flag}",
                 _x(r["efficiency_ceiling"], 3))
            )  # fmt: skip
        parts.append(_table(title, columns, cells))
    if rows["overhead"]:
        many = args.many_images
        mb = rows["overhead"][0]["image_bytes"] / 1e6
        title = (
            f"overhead: cluster chain (fan-out, sleep 0, fan-in) minus the plain chain, "
            f"{args.size}x{args.size} float32 images ({mb:.2f} MB each); slope = per-image "
            f"cost between {args.images} and {many} images (per-prompt part cancelled); "
            f"fixed = ClusterInfo prompt minus the smallest plain prompt "
            f"(target <= {TARGET_PER_IMAGE_S * 1e3:g} ms/image)"
        )
        columns = ("N", f"Δ {args.images} img", "per img", f"Δ {many} img", "per img",
                   "slope per img", "intercept", "ClusterInfo", "plain min",
                   "fixed/prompt")  # fmt: skip
        keys = ("delta_s", "per_image_s", "many_delta_s", "many_per_image_s", "slope_per_image_s",
                "intercept_s", "cluster_info_s", "plain_min_s", "fixed_s")  # fmt: skip
        cells = [(str(r["ranks"]), *(_ms(r[k]) for k in keys)) for r in rows["overhead"]]
        parts.append(_table(title, columns, cells))
    if rows["ksampler"]:
        title = (
            f"ksampler: tiny SD1.5-shaped model, batch {args.images}, "
            f"{args.ksampler_size}x{args.ksampler_size}, {args.ksampler_steps} steps, CPU "
            "(the ranks share this machine's cores)"
        )
        columns = ("N", "threads/rank", "wall", "speedup", "efficiency")
        cells = [
            (str(r["ranks"]), str(r["threads_per_rank"]), _s(r["wall_s"]),
             f"{_x(r['speedup'])}x", _x(r["efficiency"], 3))
            for r in rows["ksampler"]
        ]  # fmt: skip
        parts.append(_table(title, columns, cells))
    if rows["upstream"]:
        title = (
            f"upstream: a generation on the leader (tiny model, batch {args.images}, "
            f"{args.ksampler_size}x{args.ksampler_size}, {args.ksampler_steps} steps) feeding a "
            f"fan-out, then SleepPerImage {args.sleep_per_image:g} s/image; ideal = T1's part "
            "beside the sleep (the generation, serial on the leader) + the sleep / N"
        )
        columns = ("N", "wall", "speedup", "ideal", "ideal / wall")
        cells = [
            (str(r["ranks"]), _s(r["wall_s"]), f"{_x(r['speedup'])}x", _s(r["ideal_s"]),
             _x(r["ideal_over_wall"], 3))
            for r in rows["upstream"]
        ]  # fmt: skip
        parts.append(_table(title, columns, cells))
    if not parts:
        return "no results (every cluster failed)"
    return "\n\n".join(parts)


# --- JSON ------------------------------------------------------------------------------------


def code_fingerprint(root: Path) -> dict[str, Any]:
    """A hash of the code under test (uncommitted edits included)."""
    digest = hashlib.sha256()
    newest = 0.0
    for folder in ("collectives", "comfy_nodes", "launchers", "tools/comfyui/test_nodes"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
            newest = max(newest, path.stat().st_mtime)
    changed = datetime.datetime.fromtimestamp(newest).astimezone() if newest else None
    return {
        "sha256": digest.hexdigest()[:16],
        "covers": "collectives, comfy_nodes, launchers, tools/comfyui/test_nodes",
        "newest_change": changed.isoformat(timespec="seconds") if changed else None,
    }


def finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def document(
    argv: Sequence[str],
    args: argparse.Namespace,
    runs: Sequence[ClusterRun],
    rows: dict[str, list[Row]],
    started: datetime.datetime,
    seconds: float,
    machine: dict[str, Any],
    comfy: dict[str, Any],
    root: Path,
) -> dict[str, Any]:
    settings = {
        "ranks": args.ranks,
        "images": args.images,
        "many_images": args.many_images,
        "sleep_per_image_s": args.sleep_per_image,
        "size": args.size,
        "image_bytes": args.size * args.size * 3 * 4,
        "ksampler_steps": args.ksampler_steps,
        "ksampler_size": args.ksampler_size,
        "repeats": args.repeats,
        "measurements": args.only,
        "settle_s": args.settle,
        "threads_per_rank": "auto" if args.threads_per_rank is None else args.threads_per_rank,
        "backend": args.backend,
        "device": "cpu",
        "op_timeout_s": args.op_timeout,
    }
    doc: dict[str, Any] = finite(
        {
            "schema": SCHEMA,
            "command": [sys.executable, "-m", "benchmarks", *argv],
            "command_line": "python -m benchmarks " + " ".join(argv),
            "started": started.isoformat(timespec="seconds"),
            "seconds": seconds,
            "machine": machine,
            "versions": package_versions(),
            "comfy": comfy,
            "code": code_fingerprint(root),
            "settings": settings,
            "timing": "one prompt at a time on the leader: wall_s from just before POST /prompt "
            "to the websocket 'executing node=null' message ComfyUI sends after writing the "
            "history entry; server_s from the history's execution_start to execution_success "
            "timestamps (ms). One warm-up run per variant (kept, unused), then repeats in "
            "rotating order after a settle pause each, moved out of the windows where a rank "
            "runs ComfyUI's periodic gc.collect() (gc_wait_s; see benchmarks/e2e_gc.py); a "
            "sample answered or started > 100 ms late is rerun (up to 2 times; the late ones "
            "are kept under 'discarded'). Tables use medians; differences are medians of "
            "per-repeat differences",
            "clusters": [
                {
                    "ranks": run.ranks,
                    "ok": run.ok,
                    "error": run.error,
                    "threads_per_rank": run.threads_per_rank,
                    "startup_s": run.startup_s,
                    "ready_s": run.ready_s,
                    "loadavg": run.loadavg,
                    "status": run.status,
                    "discarded_samples": sum(
                        len(entry.get("discarded", []))
                        for variants in run.results.values()
                        for entry in variants.values()
                    ),
                    "log_tail": run.log_tail or None,
                    "samples": run.results,
                }
                for run in runs
            ],
            "results": rows,
        }
    )
    return doc


# --- PNG -------------------------------------------------------------------------------------


def plot(rows: dict[str, list[Row]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e, ax_o) = plt.subplots(1, 3, figsize=(15, 4.4))
    scaling, ksampler, overhead = rows["scaling"], rows["ksampler"], rows["overhead"]

    def xy(series: list[Row], key: str) -> tuple[list[int], list[float]]:
        pts = [(r["ranks"], r[key]) for r in series if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    if scaling:
        ax_t.plot(*xy(scaling, "wall_s"), "o-", label="scaling (SleepPerImage): measured")
        ax_t.plot(*xy(scaling, "ideal_s"), "k--", alpha=0.6, label="scaling: ideal")
        ax_e.plot(*xy(scaling, "efficiency"), "o-", label="scaling (SleepPerImage)")
    if ksampler:
        ax_t.plot(*xy(ksampler, "wall_s"), "s-", label="ksampler (tiny model, CPU)")
        ax_e.plot(*xy(ksampler, "efficiency"), "s-", label="ksampler (tiny model, CPU)")
    ax_t.set_title(f"wall time, {args.images} images")
    ax_t.set_ylabel("seconds (median)")
    ax_e.axhline(TARGET_EFFICIENCY, color="r", ls=":", lw=1, label=f"target {TARGET_EFFICIENCY}")
    ax_e.set_title("scaling efficiency T1 / (N x TN)")
    effs = [r["efficiency"] for r in (*scaling, *ksampler) if r.get("efficiency") is not None]
    ax_e.set_ylim(0, max(1.1, *(e * 1.05 for e in effs)) if effs else 1.1)

    if overhead:
        for key, label in (
            ("per_image_s", f"(cluster - plain) / {args.images}"),
            ("many_per_image_s", f"(cluster - plain) / {args.many_images}"),
            ("slope_per_image_s", "slope between the two"),
        ):
            xs, ys = xy(overhead, key)
            if xs:
                ax_o.plot(xs, [y * 1e3 for y in ys], "o-", label=label)
        xs, ys = xy(overhead, "fixed_s")
        if xs:
            ax_o.plot(xs, [y * 1e3 for y in ys], "x--", label="fixed per prompt (ClusterInfo)")
        ax_o.axhline(TARGET_PER_IMAGE_S * 1e3, color="r", ls=":", lw=1, label="target per image")
    ax_o.set_title(f"cluster overhead, {args.size}x{args.size} float32 images")
    ax_o.set_ylabel("ms")

    ranks = sorted({r["ranks"] for series in rows.values() for r in series})
    for ax in (ax_t, ax_e, ax_o):
        ax.set_xlabel("ranks N")
        if ranks:
            ax.set_xticks(ranks)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"python -m benchmarks e2e: {args.backend}, CPU, loopback", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["SCHEMA", "build_rows", "code_fingerprint", "document", "finite", "plot", "tables"]
