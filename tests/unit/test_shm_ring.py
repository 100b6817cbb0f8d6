"""The same-host ring (collectives.backends.shm_ring): a byte stream that wraps, partial writes
and reads, and what ``attach`` refuses.  Writer and reader are two mappings of one memfd in
this process (``/proc/<own pid>/fd/<fd>``), as a peer process maps it."""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Iterator

import pytest

from collectives.backends import shm_ring
from collectives.backends.shm_ring import CAPACITY, Ring

pytestmark = pytest.mark.skipif(not shm_ring.available(), reason="rings need Linux on x86-64")


@pytest.fixture
def pair() -> Iterator[tuple[Ring, Ring]]:
    fd, writer = shm_ring.create()
    try:
        reader = shm_ring.attach(os.getpid(), fd)
    finally:
        os.close(fd)
    yield writer, reader
    reader.close()
    writer.close()


def test_a_stream_longer_than_the_ring_arrives_in_order_across_the_wrap(
    pair: tuple[Ring, Ring],
) -> None:
    writer, reader = pair
    rng = random.Random(5)
    data = rng.randbytes(3 * CAPACITY + 12345)
    sent = got = 0
    out = bytearray(len(data))
    while got < len(data):
        # Writes and reads of odd sizes, so the wrap falls inside a write and inside a read.
        if sent < len(data):
            chunk = memoryview(data)[sent : sent + rng.randrange(1, CAPACITY // 3)]
            sent += writer.write(chunk)
        assert reader.readable() == sent - got
        want = rng.randrange(1, CAPACITY // 2)
        got += reader.read_into(memoryview(out)[got : got + want])
    assert bytes(out) == data
    assert writer.room() == CAPACITY


def test_a_full_ring_takes_nothing_more_until_read(pair: tuple[Ring, Ring]) -> None:
    writer, reader = pair
    assert writer.write(memoryview(bytes(CAPACITY + 100))) == CAPACITY
    assert writer.room() == 0
    assert writer.write(memoryview(b"x")) == 0
    assert reader.skip(10) == 10
    assert writer.write(memoryview(b"y" * 20)) == 10
    assert reader.readable() == CAPACITY
    assert reader.skip(CAPACITY + 5) == CAPACITY  # never past what was written
    assert reader.read_into(memoryview(bytearray(4))) == 0


def test_positions_and_flags_are_shared_between_the_mappings(pair: tuple[Ring, Ring]) -> None:
    writer, reader = pair
    reader.slots[shm_ring.ASLEEP + 1] = 1
    assert writer.slots[shm_ring.ASLEEP + 1] == 1
    writer.write(memoryview(b"abc"))
    assert reader.slots[shm_ring.WRITTEN] == 3


def _memfd(name: str, size: int, *, sealed: bool) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.mark.parametrize(
    ("name", "size", "sealed"),
    [
        ("something-else", shm_ring.TOTAL_BYTES, True),  # not a ring (a reused fd number)
        (shm_ring.NAME, shm_ring.TOTAL_BYTES, False),  # could be shrunk under the reader
        (shm_ring.NAME, 4096, True),  # the wrong size
    ],
)
def test_attach_refuses_what_is_not_a_sealed_ring(name: str, size: int, sealed: bool) -> None:
    fd = _memfd(name, size, sealed=sealed)
    try:
        with pytest.raises(OSError):
            shm_ring.attach(os.getpid(), fd)
    finally:
        os.close(fd)


def test_attach_refuses_a_plain_file_and_a_missing_descriptor() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            shm_ring.attach(os.getpid(), fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        shm_ring.attach(os.getpid(), 1 << 20)
    with pytest.raises(OSError):
        shm_ring.attach(0, 3)


def test_a_ring_cannot_be_resized_by_either_side() -> None:
    fd, writer = shm_ring.create()
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
    finally:
        os.close(fd)
        writer.close()


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shm_ring.ENV, "0")
    assert not shm_ring.available()
