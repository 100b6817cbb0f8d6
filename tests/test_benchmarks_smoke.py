"""Smoke runs of ``python -m benchmarks collectives``: the JSON has its structure and finite
numbers.  Timings are never checked against anything: this box is shared and noisy."""

from __future__ import annotations

import json
import math
import sys
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


# -- plain-socket baselines, the udp backend, p2p ----------------------------------------------


def _udp_unavailable() -> str | None:
    """Why the udp backend cannot run here (the registry's own words), or None."""
    from collectives.backends.base import get_backend_class

    try:
        get_backend_class("udp")
    except Exception as exc:
        return f"no usable 'udp' backend in collectives' registry: {exc}"
    return None


udp_available = pytest.mark.skipif(
    _udp_unavailable() is not None, reason=_udp_unavailable() or "udp available"
)


def _threaded_meshes(size: int, build: Any) -> list[Any]:
    """``size`` meshes in this process, one per thread, their port exchange a thread barrier."""
    import threading

    slots: list[Any] = [None] * size
    meshes: list[Any] = [None] * size
    gate = threading.Barrier(size)

    def rank_main(rank: int) -> None:
        def exchange(value: Any) -> list[Any]:
            slots[rank] = value
            gate.wait()
            seen = list(slots)
            gate.wait()
            return seen

        meshes[rank] = build(rank, size, exchange)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return meshes


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_raw_sockets_deliver_the_bytes(transport: str) -> None:
    """The baselines time real transfers: an allgather over 3 ranks lands every block intact
    (3 MiB and an odd tail, so GSO batches, partial windows and short datagrams all occur)."""
    import threading

    import numpy as np

    from benchmarks import _rawnet

    size, nbytes = 3, (3 << 20) + 1001
    build = _rawnet.TcpMesh.build if transport == "tcp" else _rawnet.UdpMesh.build
    pump: Any = _rawnet.pump_tcp if transport == "tcp" else _rawnet.pump_udp
    meshes = _threaded_meshes(size, build)
    rng = np.random.default_rng(7)
    sources = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(size)]
    landed = [np.zeros(size * nbytes, dtype=np.uint8) for _ in range(size)]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        flat = _rawnet.byte_view(landed[rank])
        views = {
            "tensor": [_rawnet.byte_view(sources[rank])],
            "blocks": [flat[i * nbytes : (i + 1) * nbytes] for i in range(size)],
        }
        try:
            for phase in _rawnet.phases_for("allgather", rank, size, 0, views):
                pump(meshes[rank], phase)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for mesh in meshes:
        mesh.close()
    assert not errors, errors
    for rank in range(size):
        for peer in range(size):
            if peer != rank:
                block = landed[rank][peer * nbytes : (peer + 1) * nbytes]
                assert np.array_equal(block, sources[peer]), (rank, peer)


def _baseline_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [r for r in doc["results"] if r["api"] == "inplace"]
    assert rows
    for row in rows:
        for name in ("raw-tcp", "raw-udp"):
            assert _finite_positive(row["baseline_s"][name]), (name, row["baseline_s"])
            assert _finite_positive(row["ratio_vs_baseline"][name])
    return rows


@pytest.mark.gloo
@pytest.mark.skipif(
    not collectives.available_backends().get("gloo"), reason="gloo backend not available"
)
def test_collectives_with_baselines_and_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "base.json"
    code = benchmarks_main(
        [
            "collectives", "--backend", "gloo,raw-tcp,raw-udp", "--world", "2",
            "--sizes", "1K,64K", "--ops", "broadcast,gather,allreduce,barrier", "--api",
            "inplace", "--iters", "3", "--json", str(out), "--timeout", "120",
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    assert "| op | N | size | ours | vs gloo | vs MPI | vs raw TCP | vs raw UDP |" in printed.out
    assert "[7/7] barrier" in printed.err  # progress
    doc = json.loads(out.read_text())
    assert doc["settings"]["baselines"] == ["raw-tcp", "raw-udp"]
    assert set(doc["runs"][0]["baselines"]) == {"raw-tcp", "raw-udp"}
    _baseline_rows(doc)
    assert {e["op"] for e in doc["comparison"]} == {"broadcast", "gather", "allreduce", "barrier"}
    assert (tmp_path / "base.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "base-ratios.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.gloo
@pytest.mark.skipif(
    not collectives.available_backends().get("gloo"), reason="gloo backend not available"
)
def test_p2p_goodput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p2p.json"
    code = benchmarks_main(
        [
            "p2p", "--backend", "gloo,raw-tcp,raw-udp", "--sizes", "4K,1M", "--iters", "3",
            "--json", str(out), "--timeout", "120",
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    assert "| backend | size | ours | ours GB/s |" in printed.out
    doc = json.loads(out.read_text())
    rows = _baseline_rows(doc)
    assert [(r["op"], r["size"], r["world"]) for r in rows] == [
        ("p2p", 4096, 2),
        ("p2p", 1 << 20, 2),
    ]
    assert (tmp_path / "p2p.png").read_bytes().startswith(PNG_MAGIC)


def test_subcommands_registered() -> None:
    from benchmarks import SUBCOMMANDS

    assert SUBCOMMANDS["p2p"].module == "benchmarks.p2p_bench"
    assert SUBCOMMANDS["wan"].module == "benchmarks.wan_bench"


@udp_available
def test_udp_collectives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _bench(tmp_path, capsys, "udp", "--no-png")
    _check_document(doc, "udp")
    assert doc["runs"][0]["engine"]["engine"] == "plain TCP sockets"
    for row in doc["results"]:
        # udp's own raw engine is raw-tcp: timed once, reported under both names.
        assert row["baseline_s"]["raw-tcp"] == row["raw_s"]
        assert _finite_positive(row["baseline_s"]["raw-udp"])


@udp_available
def test_udp_p2p_wan_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "udp-p2p.json"
    code = benchmarks_main(
        [
            "p2p", "--backend", "udp,raw-udp", "--mtu", "1200", "--sizes", "64K", "--iters",
            "3", "--json", str(out), "--no-png", "--timeout", "120",
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["mtu"] == 1200
    [row] = doc["results"]
    assert row["backend"] == "udp" and _finite_positive(row["ours_gbps"])


def test_machine_info_records_shm_and_warns_when_full() -> None:
    from benchmarks._report import SHM_WARN_BYTES, machine_info, shm_used_bytes, shm_warning

    used = shm_used_bytes()
    if used is not None:  # a box with /dev/shm: the figure is in every report's machine section
        assert machine_info()["shm_used_bytes"] >= 0
    assert shm_warning({"shm_used_bytes": SHM_WARN_BYTES - 1}) is None
    warning = shm_warning({"shm_used_bytes": 2 * SHM_WARN_BYTES})
    assert warning is not None and "/dev/shm" in warning and "537 MB" in warning


@udp_available
def test_udp_hop_trace_splits_one_way(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import udp_hop_trace

    assert udp_hop_trace.main(["--iters", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    times = {line.split(" us  ", 1)[1]: float(line.split()[0]) for line in lines}
    assert len(times) == 7, lines  # every step was stamped in some iteration
    assert all(_finite_positive(t) for t in times.values())
    steps = sum(t for name, t in times.items() if name != "one way in all")
    # Medians of parts need not add up to the median of the whole, but not by a factor of 2.
    assert 0.5 * times["one way in all"] < steps < 2 * times["one way in all"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_vm_readv is Linux's")
def test_cma_pages_prints_a_rate_per_kind_of_memory(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import cma_pages

    assert cma_pages.main(["--reps", "3", "--mib", "4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    kinds = {
        row.split(" | ")[0].lstrip("| "): float(row.split(" | ")[2].rstrip(" |")) for row in rows
    }
    assert set(kinds) == {"torch, 4 KiB pages", "torch, huge pages", "numpy"}, rows
    assert all(_finite_positive(rate) for rate in kinds.values())
