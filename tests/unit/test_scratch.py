"""Per-thread scratch memory for the ring reduction's partials (``algorithms.scratch``)."""

from __future__ import annotations

import threading

import torch

from collectives.algorithms import scratch
from collectives.algorithms.scratch import partial_buffer

BIG = scratch.MIN_BYTES // 4  # float32 elements: exactly MIN_BYTES


def test_a_slot_is_reused_on_its_thread_and_the_two_slots_differ() -> None:
    like = torch.zeros(1, dtype=torch.float32)
    a = partial_buffer(0, 2 * BIG, like)
    b = partial_buffer(1, 2 * BIG, like)
    again = partial_buffer(0, BIG, like)
    assert a.dtype == torch.float32 and a.numel() == 2 * BIG and again.numel() == BIG
    assert again.data_ptr() == a.data_ptr()
    assert b.data_ptr() != a.data_ptr()


def test_it_grows_to_the_largest_size_and_keeps_the_dtype() -> None:
    small = partial_buffer(0, BIG, torch.zeros(1, dtype=torch.float32))
    grown = partial_buffer(0, 2 * BIG, torch.zeros(1, dtype=torch.bfloat16))
    assert grown.dtype == torch.bfloat16 and grown.numel() == 2 * BIG
    back = partial_buffer(0, BIG, torch.zeros(1, dtype=torch.float32))
    assert back.data_ptr() == grown.data_ptr()
    assert small.numel() == BIG


def test_threads_do_not_share_it() -> None:
    like = torch.zeros(1, dtype=torch.float32)
    mine = partial_buffer(0, BIG, like).data_ptr()
    theirs: list[int] = []
    t = threading.Thread(target=lambda: theirs.append(partial_buffer(0, BIG, like).data_ptr()))
    t.start()
    t.join()
    assert theirs and theirs[0] != mine


def test_small_and_huge_partials_are_fresh() -> None:
    like = torch.zeros(1, dtype=torch.float32)
    small = [partial_buffer(0, 1000, like).data_ptr() for _ in range(2)]
    assert partial_buffer(0, 1000, like).numel() == 1000
    huge_numel = scratch.MAX_BYTES // 4 + 1
    huge = partial_buffer(0, huge_numel, like)
    kept = partial_buffer(0, BIG, like)
    assert huge.numel() == huge_numel and huge.data_ptr() != kept.data_ptr()
    assert all(p != kept.data_ptr() for p in small)
