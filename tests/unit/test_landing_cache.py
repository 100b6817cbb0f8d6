"""A block the transport landed in place is decoded once per header, never trusted blindly.

``recv_tensor`` (the ring reduction's and recursive doubling's receive) and ``place_block`` (the
seam's) share one cache of codec headers known to decode to a dtype and element count: a block
that landed in the receive buffer under such a header is already in place.  A fake link stands
in for the transport here (the layer above it is what is tested).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collectives.algorithms import blocks
from collectives.algorithms.blocks import recv_tensor
from collectives.backends.p2p import decode_tensor
from collectives.codec import DEFAULT, Encoded, encode
from collectives.deadline import Deadline
from collectives.errors import RemoteProtocolError


class _LandingLink:
    """Hands out ``payload``'s encoding, landed in the offered buffer when ``land``."""

    rank, size, codec = 0, 2, DEFAULT

    def __init__(self, payload: torch.Tensor, *, land: bool = True) -> None:
        self.payload = payload
        self.land = land
        self.decodes = 0
        self.deadline = Deadline.start(5.0, "test", 0)

    def recv(self, src: int, into: memoryview | None = None) -> Encoded:
        msg = encode(self.payload)
        if not self.land or into is None:
            return Encoded(msg.header, [memoryview(bytes(msg.buffers[0]))])
        into[:] = msg.buffers[0].cast("B")
        return Encoded(msg.header, [into])

    def decode_tensor(self, msg: Encoded, src: int) -> torch.Tensor:
        self.decodes += 1
        return decode_tensor(msg, self.codec, "test", src)

    def send(self, dst: int, msg: Encoded) -> None:
        raise AssertionError("not sent in these tests")

    def has_message(self, src: int) -> bool:
        return True


@pytest.fixture(autouse=True)
def _empty_cache() -> Any:
    blocks._FITS.clear()
    yield
    blocks._FITS.clear()


def test_a_landed_block_is_decoded_once_per_header() -> None:
    link = _LandingLink(torch.arange(8, dtype=torch.float32))
    out = torch.zeros(8)
    recv_tensor(link, 1, out)
    assert link.decodes == 1 and out.tolist() == list(range(8))
    link.payload = torch.arange(8, 16, dtype=torch.float32)  # same header, new values
    recv_tensor(link, 1, out)
    assert link.decodes == 1, "a landed block under a known header needs no decode"
    assert out.tolist() == list(range(8, 16))


def test_a_block_that_did_not_land_is_decoded_and_copied_each_time() -> None:
    link = _LandingLink(torch.arange(8, dtype=torch.float32), land=False)
    out = torch.zeros(8)
    for _ in range(2):
        recv_tensor(link, 1, out)
    assert link.decodes == 2 and out.tolist() == list(range(8))


def test_another_dtype_of_the_same_size_is_refused_after_a_known_one() -> None:
    link = _LandingLink(torch.arange(8, dtype=torch.float32))
    out = torch.zeros(8)
    recv_tensor(link, 1, out)
    link.payload = torch.arange(8, dtype=torch.int32)  # 32 bytes too, another header
    with pytest.raises(RemoteProtocolError, match="int32"):
        recv_tensor(link, 1, out)
    assert link.decodes == 2
