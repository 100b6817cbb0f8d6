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


def _address(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def test_the_buffer_pool_keeps_one_buffer_per_peer() -> None:
    pool = BufferPool(per_size=3)
    bufs = [pool.get(MIB) for _ in range(4)]
    addresses = {_address(b) for b in bufs}
    for buf in bufs:
        pool.put(buf)
    kept = [_address(pool.get(MIB)) for _ in range(4)]
    assert sum(a in addresses for a in kept) == 3  # the fourth is fresh


def test_a_lent_buffer_comes_back_once_its_holder_drops_it() -> None:
    import torch

    pool = BufferPool(per_size=2)
    buf = pool.get(MIB)
    address = _address(buf)
    held = torch.frombuffer(buf, dtype=torch.uint8)[16:]  # a view, as a zero-copy decode makes
    pool.gone(buf)
    del buf
    assert _address(pool.get(MIB)) != address  # still in use: never handed out twice
    del held
    assert _address(pool.get(MIB)) == address  # back, its pages touched already


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RUSAGE_THREAD is Linux's")
def test_a_lent_buffer_still_in_use_is_replaced_with_its_pages_touched() -> None:
    pool = BufferPool(per_size=2)
    held = pool.get(4 * MIB)
    pool.gone(held)  # and kept: the refill must make a new one
    assert pool.wanted
    assert _drain(pool) == 1
    buf = np.frombuffer(pool.get(4 * MIB), dtype=np.uint8)
    assert buf.ctypes.data != _address(held)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    buf[:] = 7  # a message landing in it
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    # Fresh memory faults once per 4 KiB page (1024 here, without transparent huge pages).
    assert faults < 64, faults


def test_the_refill_takes_back_a_lent_buffer_before_making_one() -> None:
    pool = BufferPool(per_size=2)
    first = pool.get(MIB)
    address = _address(first)
    pool.gone(first)
    del first  # dropped before the refill ran
    assert _drain(pool) == 1
    assert _address(pool.get(MIB)) == address


def test_refills_stay_within_the_pools_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BufferPool(per_size=2)
    held = [pool.get(MIB) for _ in range(5)]
    for buf in held:
        pool.gone(buf)
    assert _drain(pool) == 2  # per_size of one size, however many left

    monkeypatch.setattr(udp_pool, "POOL_BYTES", 10 * MIB)
    small = BufferPool(per_size=4)
    kept = [small.get(4 * MIB) for _ in range(3)]
    for buf in kept:
        small.gone(buf)  # the first is forgotten: three lent would pass the pool's byte bound
    assert _drain(small) == 0  # 8 MiB lent: no room for a 4 MiB replacement
    assert not small.wanted
    del kept[1:]
    assert _drain(small) == 0  # lent ones back are taken only for a wanted size


def test_a_full_pool_size_wants_no_refill() -> None:
    pool = BufferPool(per_size=1)
    kept, lent = pool.get(MIB), pool.get(MIB)
    pool.put(kept)  # one free: the size is full
    pool.gone(lent)  # and held
    assert _drain(pool) == 0
    assert _address(pool.get(MIB)) == _address(kept)


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
