"""Recycled output batches: warm memory handed out again only once no tensor uses it."""

from __future__ import annotations

import gc

import pytest
import torch

from collectives import Communicator
from comfy_nodes import recycled
from comfy_nodes.fan_in import gather_batch_to_leader

from .helpers import spmd

SHAPE = (4, 256, 256, 3)  # 3 MiB of float32


@pytest.fixture(autouse=True)
def _empty_pool() -> None:
    gc.collect()
    recycled.release_idle()


def test_memory_is_reused_once_every_tensor_on_it_is_gone() -> None:
    a = recycled.empty(SHAPE, torch.float32)
    assert a.shape == SHAPE and a.dtype == torch.float32 and a.is_contiguous()
    a.fill_(1.5)
    where = a.data_ptr()
    view = a[1:3]  # a view keeps the memory in use
    del a
    b = recycled.empty(SHAPE, torch.float32)
    assert b.data_ptr() != where
    assert torch.equal(view, torch.full((2, 256, 256, 3), 1.5))  # untouched by b
    del view
    c = recycled.empty(SHAPE, torch.float32)
    assert c.data_ptr() == where  # free again: handed out warm
    assert recycled.stats() == (2 * 3 * 2**20, 0)
    del b, c
    assert recycled.stats() == (0, 2 * 3 * 2**20)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float8_e4m3fn]
)
def test_dtypes_and_sizes(dtype: torch.dtype) -> None:
    t = recycled.empty((3, 1000, 700), dtype)
    assert t.shape == (3, 1000, 700) and t.dtype == dtype
    t.view(torch.uint8).fill_(7)  # writable to the last byte
    assert int(t.view(torch.uint8)[-1, -1, -1]) == 7


def test_small_batches_are_plain_tensors() -> None:
    t = recycled.empty((2, 8, 8, 3), torch.float32)
    assert t.shape == (2, 8, 8, 3)
    assert recycled.stats() == (0, 0)


def test_idle_memory_is_bounded_and_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recycled._pool, "idle_limit", 4 * 2**20)
    a = recycled.empty(SHAPE, torch.float32)
    b = recycled.empty(SHAPE, torch.float32)
    del a, b  # 6 MiB idle until the next take trims
    keep = recycled.empty((2, 1024, 1024), torch.uint8)  # a new size: a new mapping, in use
    keep.fill_(3)
    assert recycled.stats() == (2 * 2**20, 3 * 2**20)  # the least recently used went
    assert recycled.release_idle() == 3 * 2**20
    assert recycled.stats() == (2 * 2**20, 0)
    assert int(keep.sum()) == 3 * 2 * 2**20  # in use: never unmapped, intact


def test_fan_in_output_reuses_the_previous_batch() -> None:
    def rank(comm: Communicator) -> list[int]:
        ptrs = []
        for i in range(3):
            mine = torch.full((2, 256, 256, 3), float(comm.rank + i))
            out = gather_batch_to_leader(comm, mine, "ClusterFanInImages:1")
            if comm.rank == 0:
                want = torch.cat([torch.full((2, 256, 256, 3), float(r + i)) for r in range(2)])
                assert torch.equal(out, want)
                ptrs.append(out.data_ptr())
            del out
        return ptrs

    ptrs = spmd(2, rank)[0]
    assert ptrs[0] == ptrs[1] == ptrs[2]  # each prompt's output dropped before the next


def test_free_now_unmaps_idle_batches() -> None:
    from comfy_nodes import memory

    recycled.empty(SHAPE, torch.float32)  # dropped at once: idle
    assert recycled.stats() == (0, 3 * 2**20)
    done = memory.free_now()
    assert any(step.startswith("unmapped 3 MB") for step in done), done
    assert recycled.stats() == (0, 0)
