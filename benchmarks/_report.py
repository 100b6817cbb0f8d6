"""Turn the ranks' raw samples into result rows, a table and the JSON document.

A cell's time is the busiest rank's median: every rank times every repetition, the median per
rank resists the noise of a shared machine, and the slowest rank is when the op is done.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks._launch import REPO, WorldRun
from benchmarks._ops import OPS
from benchmarks._timing import median
from benchmarks._units import format_seconds, format_size

SCHEMA = "collectives-bench/1"
BASELINES = ("raw-tcp", "raw-udp")
# A backend whose raw engine is one of the baselines already (timed once, not twice).
RAW_IS_BASELINE = {"udp": "raw-tcp"}
TARGET_RATIO = 1.1  # ours vs raw, for tensors of at least TARGET_FROM bytes
TARGET_FROM = 1 << 20
TARGET_BACKENDS = ("mpi", "gloo")
_API_OF = {"ours": "inplace", "ours_object": "object"}


def _gbps(nbytes: int, seconds: float) -> float | None:
    if nbytes <= 0 or not math.isfinite(seconds) or seconds <= 0:
        return None
    return nbytes / seconds / 1e9


def rows_of(run: WorldRun) -> list[dict[str, Any]]:
    """One row per (op, size, api) this world measured, with every rank's samples kept."""
    reports = sorted(run.reports, key=lambda rep: int(rep["rank"]))
    if not reports:
        return []
    n = run.size
    rows: list[dict[str, Any]] = []
    for index in range(min(len(rep["cells"]) for rep in reports)):
        cells = [rep["cells"][index] for rep in reports]
        op, nbytes = cells[0]["op"], int(cells[0]["size"])
        stats: dict[str, dict[str, Any]] = {}
        for variant in cells[0]["samples"]:
            per_rank = [cell["samples"][variant] for cell in cells]
            medians = [median(samples) for samples in per_rank]
            busiest = max(range(len(medians)), key=medians.__getitem__)
            stats[variant] = {
                "time": medians[busiest],
                "busiest": busiest,
                "medians": medians,
                "samples": per_rank,
            }
        raw = stats["raw"]
        raw_done = _completion_times(raw["samples"])
        base = {name: stats[name] for name in BASELINES if name in stats}
        if run.backend in RAW_IS_BASELINE:
            base[RAW_IS_BASELINE[run.backend]] = raw
        delivered = OPS[op].delivered(nbytes, n)
        for variant, api in _API_OF.items():
            if variant not in stats:
                continue
            ours = stats[variant]
            rows.append(
                {
                    "backend": run.backend,
                    "world": n,
                    "op": op,
                    "api": api,
                    "size": nbytes,
                    "size_label": format_size(nbytes),
                    "reps": cells[0]["reps"],
                    "warmup": cells[0]["warmup"],
                    "ours_s": ours["time"],
                    "raw_s": raw["time"],
                    "ratio": ours["time"] / raw["time"] if raw["time"] > 0 else None,
                    "ratio_paired": _paired_ratio(_completion_times(ours["samples"]), raw_done),
                    "ours_gbps": _gbps(nbytes, ours["time"]),
                    "raw_gbps": _gbps(nbytes, raw["time"]),
                    "ours_agg_gbps": _gbps(delivered, ours["time"]),
                    "raw_agg_gbps": _gbps(delivered, raw["time"]),
                    "busiest_rank": {"ours": ours["busiest"], "raw": raw["busiest"]},
                    "rank_medians_s": {"ours": ours["medians"], "raw": raw["medians"]},
                    "samples_s": {"ours": ours["samples"], "raw": raw["samples"]},
                    # Plain sockets moving the same bytes, timed in the same processes.
                    "baseline_s": {name: st["time"] for name, st in base.items()},
                    "baseline_agg_gbps": {
                        name: _gbps(delivered, st["time"]) for name, st in base.items()
                    },
                    "ratio_vs_baseline": {
                        name: ours["time"] / st["time"] if st["time"] > 0 else None
                        for name, st in base.items()
                    },
                    "ratio_vs_baseline_paired": {
                        name: _paired_ratio(
                            _completion_times(ours["samples"]), _completion_times(st["samples"])
                        )
                        for name, st in base.items()
                    },
                    "baseline_samples_s": {
                        name: st["samples"] for name, st in base.items() if name in stats
                    },
                }
            )
    return rows


def _completion_times(per_rank: list[list[float]]) -> list[float]:
    """Per repetition, the slowest rank's time: when that repetition's op was done everywhere."""
    return [max(column) for column in zip(*per_rank, strict=False)]


def _paired_ratio(ours: list[float], raw: list[float]) -> float | None:
    """Median over repetitions of ours/raw, each pair timed back to back.

    Less exposed to drift than the ratio of medians (a slow spell hits both halves of a pair),
    so where the two disagree, trust this one more and the machine less.
    """
    ratios = [a / b for a, b in zip(ours, raw, strict=False) if b > 0]
    return median(ratios) if ratios else None


def _order(rows: Iterable[dict[str, Any]], ops: Sequence[str]) -> list[dict[str, Any]]:
    rank = {op: i for i, op in enumerate(ops)}
    return sorted(
        rows,
        key=lambda r: (rank.get(r["op"], len(rank)), r["api"] != "inplace", r["world"], r["size"]),
    )


def flagged(row: dict[str, Any]) -> bool:
    """Whether a row misses the target: ours within 1.1x of raw from 1 MiB up, for the thin
    wrappers (mpi, gloo) only; the local backend's raw is a memcpy floor, not a peer engine."""
    ratio = row["ratio"]
    return (
        row["backend"] in TARGET_BACKENDS
        and row["size"] >= TARGET_FROM
        and ratio is not None
        and ratio > TARGET_RATIO
    )


def table(rows: Sequence[dict[str, Any]], ops: Sequence[str], engine: str, backend: str) -> str:
    """A Markdown table: op | N | size | ours | raw | ratio | ours GB/s."""
    lines = [
        f"{backend}: ours vs raw {engine} (busiest rank's median; GB/s = size / time)",
        "",
        "| op | N | size | ours | raw | ratio | ours GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    any_flag = False
    for row in _order(rows, ops):
        label = row["op"] if row["api"] == "inplace" else f"{row['op']} (object)"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        if flagged(row):
            ratio += " *"
            any_flag = True
        gbps = "-" if row["ours_gbps"] is None else f"{row['ours_gbps']:.2f}"
        lines.append(
            f"| {label} | {row['world']} | {row['size_label']} | {format_seconds(row['ours_s'])} "
            f"| {format_seconds(row['raw_s'])} | {ratio} | {gbps} |"
        )
    if any_flag:
        lines += ["", f"* over {TARGET_RATIO}x raw at >= {format_size(TARGET_FROM)}"]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "mem_total": _proc_field("/proc/meminfo", "MemTotal"),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())  # how noisy the box was
    shm = shm_used_bytes()
    if shm is not None:
        info["shm_used_bytes"] = shm
    return info


SHM_WARN_BYTES = 256 << 20


def shm_used_bytes() -> int | None:
    """What ``/dev/shm`` holds (RAM): 1.2 GB of leftover files there made the 4-rank e2e prompts
    9-11 % slower on the reference machine (docs/benchmarks.md)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shm_warning(info: dict[str, Any]) -> str | None:
    used = info.get("shm_used_bytes")
    if used is None or used < SHM_WARN_BYTES:
        return None
    return (
        f"note: /dev/shm already holds {used / 1e6:.0f} MB (RAM); leftovers there (such as the "
        "mpich_shm_* segments of MPI jobs that were killed) slowed every prompt's page "
        "allocations on the reference machine: remove what is stale before timing"
    )


def _proc_field(path: str, name: str) -> str | None:
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def package_versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("torch", "numpy", "mpi4py", "matplotlib"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def code_fingerprint(root: Path) -> dict[str, Any]:
    """Which library code was measured: a hash of ``collectives/**/*.py`` (uncommitted edits
    included) and the newest file's change time, so runs of changing code are not confused."""
    digest = hashlib.sha256()
    newest = 0.0
    for path in sorted((root / "collectives").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        newest = max(newest, path.stat().st_mtime)
    changed = datetime.datetime.fromtimestamp(newest).astimezone() if newest else None
    return {
        "collectives_sha256": digest.hexdigest()[:16],
        "newest_change": changed.isoformat(timespec="seconds") if changed else None,
    }


def document(
    argv: Sequence[str],
    settings: dict[str, Any],
    runs: Sequence[WorldRun],
    rows: Sequence[dict[str, Any]],
    started: datetime.datetime,
    seconds: float,
    machine: dict[str, Any],
) -> dict[str, Any]:
    """The JSON written by ``--json``: everything needed to redo the table, and to distrust it."""
    versions = package_versions()
    for run in runs:
        for rep in run.reports:
            versions.update(rep.get("versions") or {})
    return {
        "schema": SCHEMA,
        "command": [sys.executable, "-m", "benchmarks", *argv],
        "command_line": "python -m benchmarks " + " ".join(argv),
        "started": started.isoformat(timespec="seconds"),
        "seconds": seconds,
        "machine": machine,
        "versions": versions,
        "code": code_fingerprint(REPO),
        "settings": settings,
        "timing": "per rank: barrier, then time one call; variants interleaved in rotating "
        "order; a cell's time is the max over ranks of each rank's median",
        "runs": [
            {
                "backend": run.backend,
                "world": run.size,
                "command": run.command,
                "seconds": run.seconds,
                "returncode": run.returncode,
                "ok": run.error is None,
                "error": run.error,
                "shutdown_error": run.shutdown_error,
                "engine": run.reports[0].get("engine", {}) if run.reports else {},
                "baselines": run.reports[0].get("baselines", {}) if run.reports else {},
                "tuning": run.reports[0].get("tuning", {}) if run.reports else {},
                "broadcast_plan": run.reports[0].get("broadcast_plan") if run.reports else None,
            }
            for run in runs
        ],
        "results": list(rows),
    }
