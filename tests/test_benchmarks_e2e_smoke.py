"""Smoke run of ``python -m benchmarks e2e`` on real ComfyUI servers (1 and 2 ranks, tiny sizes).

Checks the JSON's structure and that its numbers are finite; never a timing against anything:
this box is shared and noisy.  Needs the ComfyUI environment (.venv-comfy, built by
tools/comfyui/install.sh, or COMFY_E2E_PYTHON); without it the test fails with that command.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import main as benchmarks_main

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MEASURED = {
    "scaling": ("cluster",),
    "transfer": ("cluster", "plain"),
    "transfer_many": ("cluster", "plain"),
    "prompt": ("cluster_info", "plain_min"),
    "ksampler": ("cluster",),
    "upstream": ("cluster",),
}


def _comfy_python() -> str:
    python = os.environ.get("COMFY_E2E_PYTHON") or str(REPO / ".venv-comfy" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(
            f"no ComfyUI environment at {python}: run tools/comfyui/install.sh (from the "
            "repository root) first, or set COMFY_E2E_PYTHON to the python of one",
            pytrace=False,
        )
    return python


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _finite(value) and value > 0


def test_e2e_is_listed_and_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmarks_main([]) != 0  # usage
    listing = capsys.readouterr().out
    assert "e2e" in listing and "no module benchmarks.e2e_bench" not in listing
    with pytest.raises(SystemExit) as info:
        benchmarks_main(["e2e", "--ranks", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        benchmarks_main(["e2e", "--only", "nothing"])


@pytest.mark.comfy
def test_e2e_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    python = _comfy_python()
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    code = benchmarks_main(
        [
            "e2e", "--ranks", "1,2", "--images", "2", "--many-images", "4", "--size", "16",
            "--sleep-per-image", "0.02", "--repeats", "1", "--ksampler-steps", "1",
            "--settle", "0.05", "--python", python, "--json", str(out), "--png", str(png),
        ]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-5000:]
    assert "| N | ideal | wall | above ideal | speedup | efficiency |" in printed.out
    assert "| N | threads/rank | wall | speedup | efficiency |" in printed.out
    assert "| N | wall | speedup | ideal | ideal / wall |" in printed.out
    assert "N=2 ksampler cluster x2 (repeat 1/1)" in printed.err  # progress
    assert png.read_bytes().startswith(PNG_MAGIC)

    doc = json.loads(out.read_text())
    assert doc["schema"] == "e2e-bench/1"
    assert doc["command_line"].startswith("python -m benchmarks e2e --ranks 1,2")
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["versions"]["torch"] and doc["comfy"]["version"]
    assert doc["settings"]["ranks"] == [1, 2] and doc["settings"]["repeats"] == 1
    assert doc["settings"]["image_bytes"] == 16 * 16 * 3 * 4

    assert [c["ranks"] for c in doc["clusters"]] == [1, 2]
    for cluster in doc["clusters"]:
        assert cluster["ok"] and cluster["error"] is None, cluster["error"]
        assert _positive(cluster["startup_s"]) and _positive(cluster["ready_s"])
        assert cluster["status"]["state"] == ("single" if cluster["ranks"] == 1 else "ready")
        assert set(cluster["samples"]) == set(MEASURED)
        for key, variants in MEASURED.items():
            assert set(cluster["samples"][key]) == set(variants), key
            for entry in cluster["samples"][key].values():
                assert len(entry["samples"]) == 1
                for sample in (entry["warmup"], *entry["samples"]):
                    assert _positive(sample["wall_s"]) and _positive(sample["queued_s"])
                    assert sample["server_s"] is None or _finite(sample["server_s"])
                    assert isinstance(sample["prompt_id"], str) and sample["prompt_id"]

    results = doc["results"]
    for key in ("scaling", "overhead", "ksampler", "upstream"):
        assert [r["ranks"] for r in results[key]] == [1, 2], key
    for row in results["scaling"]:
        for name in ("ideal_s", "wall_s", "speedup", "efficiency", "ideal_over_wall"):
            assert _positive(row[name]), (name, row)
        assert _finite(row["above_ideal_s"])
        # A cluster that added nothing: 1 at one rank, and never above 1.
        assert row["serial_s"] >= 0 and 0 < row["efficiency_ceiling"] <= 1 + 1e-9, row
    assert results["scaling"][0]["efficiency_ceiling"] == pytest.approx(1.0)
    for row in results["overhead"]:
        assert row["image_bytes"] == 16 * 16 * 3 * 4 and row["many_images"] == 4
        for name in ("cluster_s", "plain_s", "many_cluster_s", "many_plain_s"):
            assert _positive(row[name]), (name, row)
        for name in ("delta_s", "per_image_s", "many_delta_s", "many_per_image_s"):
            assert _finite(row[name]), (name, row)
        for name in ("slope_per_image_s", "intercept_s", "fixed_s"):
            assert _finite(row[name]), (name, row)
        assert _positive(row["cluster_info_s"]) and _positive(row["plain_min_s"])
    for row in results["ksampler"]:
        for name in ("wall_s", "speedup", "efficiency"):
            assert _positive(row[name]), (name, row)
        assert row["threads_per_rank"] >= 1
    for row in results["upstream"]:
        for name in ("wall_s", "speedup", "ideal_s", "ideal_over_wall"):
            assert _positive(row[name]), (name, row)
        # The ideal keeps T1's part beside the sleep whole: at one rank it is T1 itself.
        assert row["serial_s"] >= 0 and row["ideal_s"] >= row["serial_s"], row
    assert results["upstream"][0]["ideal_over_wall"] == pytest.approx(1.0)
