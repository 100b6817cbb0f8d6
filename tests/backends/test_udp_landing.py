"""Where a large body lands on the udp backend when its receive is not waiting first.

A receive posted while its message is still arriving gets the rest of the body in its own
buffer (the core copies the part that came: ``Engine._land_late``), and a ring step offers its
receive's buffer before its send blocks (``algorithms.link.sendrecv``).  Either way, nothing
is copied out of a pool buffer after the message completed (``copied_in``), and every byte is
the sender's."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from collectives.backends.p2p import byte_view
from collectives.codec import encode
from collectives.communicator import Communicator
from collectives.deadline import Deadline
from tests.backends.test_udp_driver import keyed
from tests.backends.udp_worlds import run_world

_RELEASE = threading.Event()
_OFFERED = threading.Event()


def _in_progress(comm: Communicator, via_offer: bool = False) -> Any:
    data = torch.arange(1 << 20, dtype=torch.int32).view(torch.uint8)  # 4 MiB: pool-sized
    engine = comm.engine._engine  # type: ignore[attr-defined]
    comm.barrier()
    if comm.rank == 0:
        real = engine.sock.send_batch
        large = [0]

        def send_batch(addr: Any, payload: memoryview, segment: int) -> int:
            # The first few large datagrams go, the rest are lost until rank 1 has posted its
            # receive (loss recovery resends them then): the message is in progress meanwhile.
            if payload.nbytes > 2000 and not _RELEASE.is_set():
                large[0] += 1
                if large[0] > 4:
                    return int(payload.nbytes)
            return int(real(addr, payload, segment))

        engine.sock.send_batch = send_batch
        comm.send_buffer(data, 1)  # returns once framed: the lost part is resent later
        _RELEASE.wait(10.0)
        comm.barrier()
        return None
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        with engine.lock:
            if any(engine._incoming.values()):
                break  # allocated: its first frames are in a pool buffer
        time.sleep(0.002)
    out = torch.zeros_like(data)
    before = comm.stats()
    if via_offer:
        # A ring step's offer before its send (algorithms.link.sendrecv): the message ends
        # while this rank is still busy, and its take comes after that.
        from collectives.backends.p2p import p2p_channel

        comm.engine._offer(0, p2p_channel(0), byte_view(out))  # type: ignore[attr-defined]
        _RELEASE.set()
        time.sleep(0.5)
    else:
        threading.Timer(0.3, _RELEASE.set).start()  # after the receive below is posted
    comm.recv_into(out, 0)
    after = comm.stats()
    comm.barrier()
    return (
        torch.equal(out, data),
        after["landed_late"] - before["landed_late"],
        after["copied_in"] - before["copied_in"],
    )


@pytest.mark.parametrize("via_offer", [False, True], ids=["take", "offer"])
def test_a_receive_posted_mid_message_gets_the_rest_in_its_buffer(via_offer: bool) -> None:
    _RELEASE.clear()
    exact, late, copied = run_world(2, keyed(2), lambda c: _in_progress(c, via_offer))[1]
    assert exact
    assert (late, copied) == (1, 0)


def _offered(comm: Communicator) -> Any:
    from collectives.backends.p2p import COLLECTIVE_CHANNEL

    data = torch.arange(1 << 20, dtype=torch.int32).view(torch.uint8)  # 4 MiB: pool-sized
    backend = comm.engine
    comm.barrier()
    if comm.rank == 0:
        _OFFERED.wait(10.0)
        for _ in range(2):
            backend._post(1, COLLECTIVE_CHANNEL, backend.envelope("t", 1), encode(data), _dl())
        comm.barrier()
        return None
    first, second = torch.zeros_like(data), torch.zeros_like(data)
    before = comm.stats()
    into = byte_view(first)
    withdraw = backend._offer(0, COLLECTIVE_CHANNEL, into)
    _OFFERED.set()
    time.sleep(0.5)  # both messages arrive meanwhile: the first lands in its offered buffer
    _, msg = backend._take(0, COLLECTIVE_CHANNEL, _dl(), into)
    landed_in_place = msg.buffers[0] is into
    # An offer withdrawn before its take: the next message is not written into it.
    unused = torch.zeros_like(data)
    backend._offer(0, COLLECTIVE_CHANNEL, byte_view(unused))()
    _, msg = backend._take(0, COLLECTIVE_CHANNEL, _dl(), None)
    second.view(-1).numpy()[:] = np.frombuffer(msg.buffers[0], dtype=np.uint8)
    after = comm.stats()
    comm.barrier()
    return (
        callable(withdraw),
        landed_in_place,
        torch.equal(first, data) and torch.equal(second, data),
        bool(unused.any()),
        after["landed"] - before["landed"],
    )


def _dl() -> Deadline:
    return Deadline.start(10.0, "t", 0)


def test_an_offered_buffer_takes_its_message_and_a_withdrawn_one_none() -> None:
    _OFFERED.clear()
    withdrawable, in_place, exact, unused_written, landed = run_world(2, keyed(2), _offered)[1]
    assert withdrawable and in_place and exact
    assert not unused_written and landed == 1
