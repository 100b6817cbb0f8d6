"""The udp backend's receive-buffer pool: what it keeps, and the buffers it replaces while the
rank is quiet (their pages touched off the receive path)."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import numpy as np
import pytest

from collectives.backends import udp_pool
from collectives.backends.udp_pool import BufferPool
from collectives.communicator import Communicator
from tests.backends.test_udp_driver import keyed
from tests.backends.udp_worlds import run_world

MIB = 1 << 20


def _drain(pool: BufferPool) -> int:
    """Run the refill to its end; how many buffers it finished."""
    finished = 0
    for _ in range(10_000):
        if not pool.wanted:
            return finished
        finished += pool.refill_step()
    raise AssertionError("the refill never ends")


def test_the_buffer_pool_keeps_one_buffer_per_peer() -> None:
    pool = BufferPool(per_size=3)
    bufs = [pool.get(MIB) for _ in range(4)]
    for buf in bufs:
        pool.put(buf)
    kept = [pool.get(MIB) for _ in range(4)]
    assert sum(any(k is b for b in bufs) for k in kept) == 3  # the fourth is fresh


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RUSAGE_THREAD is Linux's")
def test_a_buffer_that_left_is_replaced_with_its_pages_touched() -> None:
    pool = BufferPool(per_size=2)
    pool.gone(4 * MIB)
    assert pool.wanted
    assert _drain(pool) == 1
    buf = np.frombuffer(pool.get(4 * MIB), dtype=np.uint8)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    buf[:] = 7  # a message landing in it
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    # Fresh memory faults once per 4 KiB page (1024 here, without transparent huge pages).
    assert faults < 64, faults


def test_refills_stay_within_the_pools_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BufferPool(per_size=2)
    for _ in range(5):
        pool.gone(MIB)
    assert _drain(pool) == 2  # per_size of one size, however many left

    monkeypatch.setattr(udp_pool, "POOL_BYTES", 6 * MIB)
    small = BufferPool(per_size=4)
    for _ in range(3):
        small.gone(4 * MIB)
    assert _drain(small) == 1  # the second 4 MiB would pass the pool's byte bound
    assert not small.wanted


def test_a_full_pool_size_wants_no_refill() -> None:
    pool = BufferPool(per_size=1)
    pool.put(pool.get(MIB))  # one kept: the size is full
    pool.gone(MIB)
    assert _drain(pool) == 0


def _zero_copy_receives(comm: Communicator) -> Any:
    import torch

    n = MIB  # 4 MiB of float32: a pool-sized body
    if comm.rank == 0:
        for i in range(2):
            comm.send(torch.full((n,), float(i)), 1)
            comm.recv(1)  # the receiver is ready for the next
        return None
    got = []
    for i in range(2):
        got.append(comm.recv(0))  # no buffer of ours: the pool buffer is handed over
        end = time.monotonic() + 5.0
        while comm.stats()["refilled"] < i + 1 and time.monotonic() < end:
            time.sleep(0.01)  # quiet: the IO thread replaces it
        comm.send(b"next", 0)
    return [t[0].item() == t[-1].item() == i for i, t in enumerate(got)], comm.stats()["refilled"]


def test_the_io_thread_replaces_a_buffer_handed_over() -> None:
    exact, refilled = run_world(2, keyed(2), _zero_copy_receives)[1]
    assert exact == [True, True]
    assert refilled == 2
