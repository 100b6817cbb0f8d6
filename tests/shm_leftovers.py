"""MPICH's shared-memory segments that a failed MPI job leaves in ``/dev/shm``.

MPICH maps a ``mpich_shm_*`` file per node and removes it in ``MPI_Finalize``.  The conformance
scenarios that end in a timeout or a mismatch poison the communicator, whose ranks then leave
without finalizing (pending requests cannot be finalized), so each such job leaves 2-4 MB in
``/dev/shm`` (RAM).  The suite removes, when it ends, the segments that appeared during it and
that no live process maps: a concurrent MPI job of the user keeps its own.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "mpich_shm_"


def segments(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir() if p.name.startswith(PREFIX)}
    except OSError:
        return set()


def mapped_paths() -> set[str]:
    """Every file path some process maps (those of ours we may read: all of them as root)."""
    paths: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6:
                        paths.add(parts[5].strip().removesuffix(" (deleted)"))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return paths


def remove_leftovers(folder: Path, before: set[str]) -> list[str]:
    """Remove the segments in ``folder`` that are not in ``before`` and that nobody maps."""
    new = segments(folder) - before
    if not new:
        return []
    in_use = mapped_paths()
    removed = []
    for name in sorted(new):
        path = folder / name
        if str(path) in in_use:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(name)
    return removed
