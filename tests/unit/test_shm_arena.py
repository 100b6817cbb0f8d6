"""The arena's slots (collectives.backends.shm_arena): who may write when, what a reader sees,
the mark of a payload that does not fit, and a slot that announces more than it holds.  Three
ranks' views of one mapping in this process (rank 0 made it; the others map it through
``/proc/<own pid>/fd/<fd>``, as a peer process does)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from collectives.backends import futex, shm_arena, shm_ring
from collectives.backends.shm_arena import CAPACITY, Arena

pytestmark = pytest.mark.skipif(not shm_ring.available(), reason="arenas need Linux on x86-64")


@pytest.fixture
def arenas() -> list[Arena]:
    fd, area = shm_arena.create(3)
    try:
        views = [Arena(area, 0, 3)]
        views += [Arena(shm_arena.attach(os.getpid(), fd, 3), r, 3) for r in (1, 2)]
    finally:
        os.close(fd)
    return views


def test_an_op_is_ready_once_its_rank_wrote_it_and_reads_back_whole(arenas: list[Arena]) -> None:
    a0, a1, a2 = arenas
    assert not a1.ready(0, 1)
    assert a0.publish(1, b"meta", [memoryview(b"body"), memoryview(b"!")])
    assert a1.ready(0, 1) and a2.ready(0, 1)
    assert not a1.all_ready(1)
    meta, body = a1.slot(0, 1)
    assert bytes(meta) == b"meta" and body is not None and bytes(body) == b"body!"
    a1.publish(1, b"m1", [])
    a2.publish(1, b"m2", [memoryview(b"x")])
    assert a0.all_ready(1)


def test_a_slot_is_written_again_only_when_every_rank_is_done_with_it(
    arenas: list[Arena],
) -> None:
    a0, a1, a2 = arenas
    for a in arenas:
        a.publish(1, b"one", [])
    assert a0.free(2)  # op 2 uses the other slot
    for a in arenas:
        a.publish(2, b"two", [])
    assert not a0.free(3)  # op 3 reuses op 1's slot: nobody said they are done with op 1
    assert a0.behind(1) == [0, 1, 2]
    a0.finish(1)
    a1.finish(1)
    assert not a0.free(3) and a0.behind(1) == [2]
    a2.finish(1)
    assert a0.free(3)
    a0.publish(3, b"three", [])
    assert a1.ready(0, 3) and not a1.ready(0, 1)
    assert bytes(a1.slot(0, 2)[0]) == b"two"  # the other slot is untouched


def test_a_payload_that_does_not_fit_leaves_a_mark_and_its_meta(arenas: list[Arena]) -> None:
    a0, a1, _ = arenas
    assert not a0.publish(1, b"meta", [memoryview(bytes(CAPACITY))])
    meta, body = a1.slot(0, 1)
    assert bytes(meta) == b"meta" and body is None
    assert a0.publish(3, b"m", [memoryview(bytes(CAPACITY - 1))])  # exactly full fits
    assert a1.slot(0, 3)[1] is not None


def test_a_slot_that_announces_more_than_it_holds_is_refused(arenas: list[Arena]) -> None:
    a0, a1, _ = arenas
    a0.publish(1, b"meta", [])
    a0._heads[1][shm_arena.BODY] = CAPACITY  # a peer's corrupt head (op 1: slot 1)
    with pytest.raises(ValueError, match="announces"):
        a1.slot(0, 1)


def _sleep_in_thread(arena: Arena, word: int, ready: Callable[[], bool]) -> Callable[[], Any]:
    """Start ``arena.sleep`` in a thread (20 s timeout); returns a join giving (ready, secs)."""
    woke: list[tuple[bool, float]] = []

    def sleeper() -> None:
        start = time.monotonic()
        woke.append((arena.sleep(word, ready, timeout_s=20.0), time.monotonic() - start))

    thread = threading.Thread(target=sleeper)
    thread.start()
    deadline = time.monotonic() + 10
    while arena._control[arena.rank][shm_arena.SLEEPS] != 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # until it has raised its flag
    time.sleep(0.05)  # (and, most likely, sleeps)

    def join() -> Any:
        thread.join(15)
        return woke[0] if woke else None

    return join


def test_a_sleeper_wakes_when_the_last_rank_writes_its_slot_not_before(
    arenas: list[Arena],
) -> None:
    a0, a1, a2 = arenas
    a0.publish(1, b"m", [])
    join = _sleep_in_thread(a0, shm_arena.COMPLETE, lambda: a0.all_ready(1))
    a1.publish(1, b"m", [])
    time.sleep(0.1)
    assert a0._control[0][shm_arena.SLEEPS] == 1  # one rank is still missing: asleep
    assert a0.missing(1) == [2]
    a2.publish(1, b"m", [])
    got = join()
    assert got is not None and got[0], got
    assert got[1] < 10, "the last slot did not wake the sleeper; it slept its timeout"
    assert a0._control[0][shm_arena.SLEEPS] == 0  # lowered after
    assert a0._world[shm_arena.COMPLETE] == 1


def test_a_sleeper_wakes_when_every_rank_is_done(arenas: list[Arena]) -> None:
    a0, a1, a2 = arenas
    for a in arenas:
        a.publish(1, b"m", [])
        a.publish(2, b"m", [])
    a0.finish(1)
    a1.finish(1)
    join = _sleep_in_thread(a0, shm_arena.DRAINED, lambda: a0.free(3))
    a2.finish(1)
    got = join()
    assert got is not None and got[0] and got[1] < 10, got
    assert a0._world[shm_arena.DRAINED] == 1


def test_sleep_returns_at_once_when_ready_or_times_out(arenas: list[Arena]) -> None:
    a0 = arenas[0]
    start = time.monotonic()
    assert a0.sleep(shm_arena.COMPLETE, lambda: True, timeout_s=20.0)
    assert time.monotonic() - start < 5
    start = time.monotonic()
    assert not a0.sleep(shm_arena.COMPLETE, lambda: a0.all_ready(1), timeout_s=0.05)
    assert 0.04 < time.monotonic() - start < 5


def test_only_the_store_that_completes_an_op_wakes_and_only_with_a_sleeper(
    arenas: list[Arena], monkeypatch: pytest.MonkeyPatch
) -> None:
    a0, a1, a2 = arenas
    wakes: list[int] = []
    monkeypatch.setattr(futex, "wake", lambda address: wakes.append(address) or 0)
    for a in arenas:
        a.publish(1, b"m", [])
    assert wakes == [] and a0._world[shm_arena.COMPLETE] == 1  # complete, nobody asleep
    a1._control[1][shm_arena.SLEEPS] = 1  # rank 1 sleeps
    a0.publish(3, b"m", [])
    a2.publish(3, b"m", [])
    assert wakes == []  # op 3 is not whole yet
    a1.publish(3, b"m", [])
    assert len(wakes) == 1 and a0._world[shm_arena.COMPLETE] == 3


def test_a_stale_bell_value_does_not_sleep() -> None:
    word = bytearray(8)
    address = futex.address_of(word)
    start = time.monotonic()
    assert futex.wait(address, 1, 20.0)  # the word holds 0, not 1
    assert time.monotonic() - start < 5
    assert not futex.wait(address, 0, 0.02)  # holds 0: sleeps until the timeout
    assert futex.wake(address) == 0


def test_attach_refuses_a_ring_or_the_wrong_world_size() -> None:
    fd, _ = shm_arena.create(3)
    ring_fd, _ = shm_ring.create()
    try:
        with pytest.raises(OSError):
            shm_arena.attach(os.getpid(), fd, 4)
        with pytest.raises(OSError):
            shm_arena.attach(os.getpid(), ring_fd, 3)
    finally:
        os.close(fd)
        os.close(ring_fd)
