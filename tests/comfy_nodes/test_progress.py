"""Collective nodes report to ComfyUI's progress bar (a recorder stands in for comfy.utils)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from collectives import Communicator
from collectives.testing import run_local
from comfy_nodes import cluster
from comfy_nodes.collective import gather


class _Bar:
    made: ClassVar[list[_Bar]] = []

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        _Bar.made.append(self)

    def update_absolute(self, value: int) -> None:
        self.done = value


def test_each_collective_fills_one_bar() -> None:
    def fn(comm: Communicator) -> Any:
        return gather(comm, torch.full((2,), comm.rank), "ClusterFanInImages#7")

    class WithBars(cluster.Runtime):
        def progress_bar(self, total: int) -> Any:
            return _Bar(total)

    with cluster.installed(WithBars()):
        out = run_local(3, fn)
    assert [t.tolist() for t in out[0]] == [[0, 0], [1, 1], [2, 2]]
    assert len(_Bar.made) == 3 and all(b.total == 1 and b.done == 1 for b in _Bar.made)
