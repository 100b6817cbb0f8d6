"""The suite's clean-up of MPICH segments: only new ones, only unmapped ones."""

from __future__ import annotations

import mmap
from pathlib import Path

from tests.shm_leftovers import remove_leftovers, segments


def _segment(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"\0" * 4096)
    return path


def test_removes_only_new_unmapped_segments(tmp_path: Path) -> None:
    old = _segment(tmp_path, "mpich_shm_old_0")
    before = segments(tmp_path)
    new = _segment(tmp_path, "mpich_shm_new_0")
    other = _segment(tmp_path, "not_mpich_0")
    live = _segment(tmp_path, "mpich_shm_live_0")
    with live.open("r+b") as f, mmap.mmap(f.fileno(), 4096):
        removed = remove_leftovers(tmp_path, before)
    assert removed == ["mpich_shm_new_0"]
    assert not new.exists()
    assert old.exists() and other.exists() and live.exists()


def test_nothing_new_removes_nothing(tmp_path: Path) -> None:
    _segment(tmp_path, "mpich_shm_a_0")
    assert remove_leftovers(tmp_path, segments(tmp_path)) == []
    assert segments(tmp_path) == {"mpich_shm_a_0"}
