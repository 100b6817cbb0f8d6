"""Offers ahead of receives: ``algorithms.link.sendrecv`` offers the receive's buffer before the
send, a gather offers every block before it waits; an offer no receive took is withdrawn (no
later op's message may land in a buffer nobody takes)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from collectives.algorithms.link import sendrecv
from collectives.codec import Encoded, encode


class _Link:
    def __init__(self, *, offers: bool = True, fail_send: bool = False) -> None:
        self.calls: list[str] = []
        self._fail = fail_send
        if offers:
            self.offer = self._offer

    def _offer(self, src: int, into: memoryview) -> Callable[[], None]:
        self.calls.append(f"offer {src} {into.nbytes}")
        return lambda: self.calls.append(f"withdraw {src}")

    def send(self, dst: int, msg: Encoded) -> None:
        self.calls.append(f"send {dst}")
        if self._fail:
            raise TimeoutError("the peer went away")

    def recv(self, src: int, into: memoryview | None = None) -> Encoded:
        self.calls.append(f"recv {src} {None if into is None else into.nbytes}")
        return encode(b"answer")


def test_the_receive_is_offered_before_the_send() -> None:
    link = _Link()
    got = sendrecv(link, 1, encode(b"mine"), 3, memoryview(bytearray(8)))  # type: ignore[arg-type]
    assert got.buffers
    assert link.calls == ["offer 3 8", "send 1", "recv 3 8"]


def test_no_buffer_or_no_offer_is_a_plain_send_and_recv() -> None:
    link = _Link()
    sendrecv(link, 1, encode(b"mine"), 3)  # type: ignore[arg-type]
    plain = _Link(offers=False)
    sendrecv(plain, 1, encode(b"mine"), 3, memoryview(bytearray(8)))  # type: ignore[arg-type]
    assert link.calls == ["send 1", "recv 3 None"]
    assert plain.calls == ["send 1", "recv 3 8"]


def test_a_failed_send_withdraws_the_offer() -> None:
    link = _Link(fail_send=True)
    with pytest.raises(TimeoutError):
        sendrecv(link, 1, encode(b"mine"), 3, memoryview(bytearray(8)))  # type: ignore[arg-type]
    assert link.calls == ["offer 3 8", "send 1", "withdraw 3"]


class _GatherLink(_Link):
    rank, size = 0, 3

    def has_message(self, src: int) -> bool:
        return False


def test_a_gather_offers_every_block_before_it_waits() -> None:
    from collectives.algorithms import gather

    link = _GatherLink()
    into = [None, memoryview(bytearray(8)), memoryview(bytearray(4))]
    got = gather(link, encode(b"mine"), 0, into=into)  # type: ignore[arg-type]
    assert got is not None and len(got) == 3
    assert link.calls == [
        "offer 1 8",
        "offer 2 4",
        "recv 1 8",
        "recv 2 4",
        "withdraw 1",  # no-ops once their receive took them (the backend's concern)
        "withdraw 2",
    ]


def test_a_failed_gather_withdraws_its_offers() -> None:
    from collectives.algorithms import gather

    class _Failing(_GatherLink):
        def recv(self, src: int, into: memoryview | None = None) -> Encoded:
            self.calls.append(f"recv {src}")
            raise TimeoutError("rank 1 went away")

    link = _Failing()
    into = [None, memoryview(bytearray(8)), memoryview(bytearray(4))]
    with pytest.raises(TimeoutError):
        gather(link, encode(b"mine"), 0, into=into)  # type: ignore[arg-type]
    assert link.calls == ["offer 1 8", "offer 2 4", "recv 1", "withdraw 1", "withdraw 2"]
