"""What the destructive scenarios must show on every backend."""

from __future__ import annotations

from typing import Any

SLACK_S = 5.0


def assert_mismatch(results: dict[int, dict[str, Any]], timeout: float) -> None:
    errors = {r: res["error"] for r, res in results.items()}
    assert all(errors.values()), f"a rank finished mismatched calls without an error: {errors}"
    assert all(
        e.startswith(("CollectiveMismatchError", "CollectiveTimeoutError", "ConnectionLostError"))
        for e in errors.values()
    ), errors
    for rank, res in results.items():
        assert res["elapsed"] < 2 * timeout + SLACK_S, f"rank {rank} took {res['elapsed']:.1f} s"


def assert_gatherv_mismatch(results: dict[int, dict[str, Any]], timeout: float) -> None:
    root = results[0]["error"]
    assert root and root.startswith("CollectiveMismatchError") and "rank 1" in root, root
    for rank, res in results.items():
        if rank != 0:
            assert res["error"] is None, (rank, res)  # a sender's part went through
        assert res["elapsed"] < timeout + SLACK_S, f"rank {rank} took {res['elapsed']:.1f} s"


def assert_silent_rank(results: dict[int, dict[str, Any]], size: int, timeout: float) -> None:
    silent = size - 1
    others = {r: res for r, res in results.items() if r != silent}
    assert len(others) == size - 1, f"missing reports: {sorted(results)}"
    for rank, res in others.items():
        err = res["error"]
        assert err and err.startswith(("CollectiveTimeoutError", "ConnectionLostError")), (
            rank,
            err,
        )
        assert res["elapsed"] < timeout + SLACK_S, f"rank {rank} took {res['elapsed']:.1f} s"
    named = " ".join(res["error"] for res in others.values())
    assert f"rank(s) {silent}" in named or f"rank {silent}" in named or "unknown" in named, named
