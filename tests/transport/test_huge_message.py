"""A message larger than 2 GiB crosses the core intact (64-bit offsets and lengths end to end).

One body of 2 GiB + 3 bytes, given as two buffers whose seam is not frame-aligned, moves
between two endpoints in memory (no loss: the segmentation arithmetic, not recovery, is under
test) and arrives byte for byte.  About 5 GiB of memory and some seconds: marked ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from collectives.transport import TransportConfig
from collectives.transport.events import MessageReceived, MessageSent
from tests.transport.pairs import Mesh

pytestmark = pytest.mark.slow

TOTAL = (2 << 30) + 3


def test_a_message_over_2_gib_arrives_intact() -> None:
    pattern = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8)
    body = np.resize(pattern, TOTAL)  # a repeated random pattern: any misplaced block shows
    seam = (1 << 30) + 12345  # the two buffers meet inside a frame
    parts = [memoryview(body[:seam]).cast("B"), memoryview(body[seam:]).cast("B")]
    mesh = Mesh(2, TransportConfig(max_datagram=65000, window_bytes=64 << 20), gro=True)
    msg_id = mesh.endpoints[0].send(1, 5, b"meta", parts, mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)), max_time=600.0)
    (got,) = mesh.of(1, MessageReceived)
    assert (got.peer, got.channel, got.message_id, bytes(got.meta)) == (0, 5, msg_id, b"meta")
    assert got.body.nbytes == TOTAL
    received = np.frombuffer(got.body, dtype=np.uint8)
    assert np.array_equal(received[:seam], body[:seam])
    assert np.array_equal(received[seam:], body[seam:])
