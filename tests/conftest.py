"""Suite-wide settings: hypothesis profile, and GPU tests only where a GPU is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `gpu` tests need a CUDA device; on a machine without one they are deselected (and counted
    # in the summary line), never reported as passed.  Run them with a GPU: pytest -m gpu.
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(autouse=True, scope="session")
def _mpich_segments_removed() -> Iterator[None]:
    """Failed MPI scenarios leave MPICH segments in /dev/shm: removed at the end (see
    :mod:`tests.shm_leftovers`)."""
    from tests.shm_leftovers import remove_leftovers, segments

    shm = Path("/dev/shm")
    before = segments(shm)
    yield
    remove_leftovers(shm, before)
