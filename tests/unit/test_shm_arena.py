"""The arena's slots (collectives.backends.shm_arena): who may write when, what a reader sees,
the mark of a payload that does not fit, and a slot that announces more than it holds.  Three
ranks' views of one mapping in this process (rank 0 made it; the others map it through
``/proc/<own pid>/fd/<fd>``, as a peer process does)."""

from __future__ import annotations

import os

import pytest

from collectives.backends import shm_arena, shm_ring
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


def test_sleepers_are_the_other_ranks_with_their_flag_up(arenas: list[Arena]) -> None:
    a0, a1, a2 = arenas
    assert a0.sleepers() == []
    a1.sleep_flag(1)
    a0.sleep_flag(1)
    assert a0.sleepers() == [1] and a2.sleepers() == [0, 1]
    a1.sleep_flag(0)
    assert a2.sleepers() == [0]


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
