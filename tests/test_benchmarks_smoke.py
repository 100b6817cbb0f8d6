"""Smoke runs of ``python -m benchmarks collectives``: the JSON has its structure and finite
numbers.  Timings are never checked against anything: this box is shared and noisy."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import collectives
from benchmarks.__main__ import main as benchmarks_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str, *extra: str
) -> dict[str, Any]:
    # In process, through the same entry point as `python -m benchmarks`: the parent side needs
    # no interpreter of its own (mpi and gloo ranks are still real processes, started by it).
    out = tmp_path / f"{backend}.json"
    code = benchmarks_main(
        [
            "collectives", "--backend", backend, "--world", "2", "--sizes", "1K",
            "--ops", "broadcast,allreduce", "--iters", "3", "--json", str(out), "--timeout", "90",
            *extra,
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    assert "| op | N | size | ours | raw | ratio | ours GB/s |" in printed.out
    assert "[2/2] allreduce 1K" in printed.err  # progress
    return dict(json.loads(out.read_text()))


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_document(doc: dict[str, Any], backend: str) -> None:
    assert doc["schema"] == "collectives-bench/1"
    assert doc["command_line"].startswith(f"python -m benchmarks collectives --backend {backend}")
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["versions"]["torch"] and doc["versions"]["numpy"]
    assert doc["settings"]["sizes"] == [1024] and doc["settings"]["iters"] == 3
    [run] = doc["runs"]
    assert run["backend"] == backend and run["world"] == 2
    assert run["ok"] and run["error"] is None, run["error"]
    assert run["engine"]["engine"]

    rows = doc["results"]
    assert {(r["op"], r["api"]) for r in rows} == {
        ("broadcast", "inplace"),
        ("broadcast", "object"),
        ("allreduce", "inplace"),
    }
    for row in rows:
        assert (row["backend"], row["world"], row["size"], row["reps"]) == (backend, 2, 1024, 3)
        for key in ("ours_s", "raw_s", "ratio", "ours_gbps", "raw_gbps", "ours_agg_gbps"):
            assert _finite_positive(row[key]), (key, row[key])
        assert row["ratio"] == pytest.approx(row["ours_s"] / row["raw_s"])
        for variant in ("ours", "raw"):
            per_rank = row["samples_s"][variant]
            assert len(per_rank) == 2 and all(len(s) == 3 for s in per_rank)
            assert all(math.isfinite(x) and x >= 0 for s in per_rank for x in s)
            assert row["busiest_rank"][variant] in (0, 1)
            assert max(row["rank_medians_s"][variant]) == row[f"{variant}_s"]


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmarks_main([]) != 0  # usage, not a run
    listing = capsys.readouterr().out
    assert "collectives" in listing and "codec" in listing


def test_local(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _bench(tmp_path, capsys, "local", "--png", str(tmp_path / "local.png"))
    _check_document(doc, "local")
    assert (tmp_path / "local.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.gloo
@pytest.mark.skipif(
    not collectives.available_backends().get("gloo"), reason="gloo backend not available"
)
def test_gloo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_document(_bench(tmp_path, capsys, "gloo", "--no-png"), "gloo")


@pytest.mark.mpi
@pytest.mark.skipif(
    not collectives.available_backends().get("mpi"), reason="mpi backend not available"
)
def test_mpi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_document(_bench(tmp_path, capsys, "mpi", "--no-png"), "mpi")
