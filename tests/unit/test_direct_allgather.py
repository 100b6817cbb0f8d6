"""The direct allgather of worlds of 3-4 ranks (``algorithms.ring``) over a recording link:
what it offers, posts and takes, and that no offer outlives a failed op (a later op's message
would land in this op's buffer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from collectives.algorithms import ring
from collectives.codec import CodecOptions, Encoded, encode
from collectives.deadline import Deadline
from collectives.errors import ConnectionLostError


class _Recording:
    """Rank 0 of a 4-rank world whose peers' blocks are ready; ``fail_from``: the peer whose
    receive fails."""

    send_copies = True

    def __init__(self, fail_from: int | None = None, fail_send: bool = False) -> None:
        self.rank, self.size = 0, 4
        self.codec = CodecOptions()
        self.deadline = Deadline.start(10.0, "allgather", 0)
        self.fail_from, self.fail_send = fail_from, fail_send
        self.offered: set[int] = set()
        self.log: list[tuple[str, int]] = []

    def offer(self, src: int, into: memoryview) -> Callable[[], None]:
        self.offered.add(src)
        self.log.append(("offer", src))
        return lambda: self.offered.discard(src)

    def send_each(self, posts: Sequence[tuple[int, Encoded]]) -> None:
        if self.fail_send:
            raise ConnectionLostError("rank 2 is gone", [2])
        self.log.extend(("send", dst) for dst, _ in posts)

    def send(self, dst: int, msg: Encoded) -> None:
        raise AssertionError("the direct exchange posts through send_each")

    def recv(self, src: int, into: memoryview | None = None) -> Encoded:
        self.log.append(("recv", src))
        if src == self.fail_from:
            raise ConnectionLostError(f"rank {src} is gone", [src])
        self.offered.discard(src)  # a take uses up its offer, as the udp inbox's does
        return encode(bytes([src]) * 8)

    def has_message(self, src: int) -> bool:
        return True

    def decode_tensor(self, msg: Encoded, src: int) -> Any:
        raise AssertionError("not a tensor op")


def _into() -> list[memoryview | None]:
    return [memoryview(bytearray(8)) for _ in range(4)]


def test_it_offers_every_buffer_posts_to_everyone_then_takes() -> None:
    link = _Recording()
    mine = encode(b"\0" * 8)
    out = ring.allgather(link, mine, _into())
    assert out[0] is mine and [bytes(m.buffers[0]) for m in out[1:]] == [
        bytes([r]) * 8 for r in (1, 2, 3)
    ]
    assert link.log == [
        ("offer", 1), ("offer", 2), ("offer", 3),
        ("send", 1), ("send", 2), ("send", 3),
        ("recv", 1), ("recv", 2), ("recv", 3),
    ]  # fmt: skip
    assert link.offered == set()


@pytest.mark.parametrize(("fail_from", "fail_send"), [(2, False), (None, True)])
def test_a_failed_op_withdraws_every_offer_left(fail_from: int | None, fail_send: bool) -> None:
    link = _Recording(fail_from, fail_send)
    with pytest.raises(ConnectionLostError):
        ring.allgather(link, encode(b"\0" * 8), _into())
    assert link.offered == set(), "an offer outlived the failed allgather"


def test_without_eager_sends_it_keeps_the_ring() -> None:
    class _Ring(_Recording):
        send_copies = False

        def send(self, dst: int, msg: Encoded) -> None:
            self.log.append(("send", dst))

    link = _Ring()
    ring.allgather(link, encode(b"\0" * 8), _into())
    assert [dst for what, dst in link.log if what == "send"] == [1, 1, 1]
