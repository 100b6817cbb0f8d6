"""The small-message paths of the udp backend and the P2P seam: the agreement token held back
for the collective's first data message (one frame for both), its flush when the collective
fails, the cache that lets a landed block skip its decode (and still refuses a mismatch), the
receive buffer handed back as itself, the IO thread's hand-over after a long wait, and where a
waiting caller may spin on the socket."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from collectives.algorithms.sync import TOKEN
from collectives.backends import udp_wait
from collectives.backends.base import OpContext
from collectives.backends.envelope import Envelope
from collectives.backends.p2p import (
    AGREEMENT_CHANNEL,
    COLLECTIVE_CHANNEL,
    P2PBackend,
    _Agreement,
    byte_view,
    place_block,
)
from collectives.codec import DEFAULT, Encoded, encode
from collectives.communicator import Communicator
from collectives.deadline import Deadline
from collectives.errors import CollectiveMismatchError
from tests.backends.test_udp_driver import keyed
from tests.backends.udp_worlds import run_world


def _held_token(comm: Communicator) -> Any:
    backend = comm.engine
    engine = backend._engine  # type: ignore[attr-defined]
    dl = Deadline.start(10.0, "test", comm.rank)
    env = backend.envelope("test", 1, 0)  # type: ignore[attr-defined]
    data = torch.arange(256, dtype=torch.int32)
    comm.barrier()
    if comm.rank == 1:
        _, token = backend._take(0, AGREEMENT_CHANNEL, dl)  # type: ignore[attr-defined]
        _, got = backend._take(0, COLLECTIVE_CHANNEL, dl)  # type: ignore[attr-defined]
        comm.barrier()
        return token.header == TOKEN.header, bytes(got.buffers[0]) == data.numpy().tobytes()
    time.sleep(0.2)  # the barrier's ACKs are out: nothing else is due to be sealed
    with engine.lock:
        # Counted as a driving caller: the IO thread takes no turn (which would send the held
        # token on its own, as it should) until the two posts are done.
        engine._drivers += 1
    before = engine.stats()["frames_sealed"]
    backend._post_soon(1, AGREEMENT_CHANNEL, env, TOKEN, dl)  # type: ignore[attr-defined]
    held = engine._held
    sealed_while_held = engine.stats()["frames_sealed"] - before
    backend._post(1, COLLECTIVE_CHANNEL, env, encode(data), dl)  # type: ignore[attr-defined]
    sealed = engine.stats()["frames_sealed"] - before
    with engine.lock:
        engine._drivers -= 1
    comm.barrier()
    return held, sealed_while_held, sealed


def test_a_held_token_leaves_in_the_frame_of_the_next_post() -> None:
    (held, while_held, sealed), (token, ok) = run_world(2, keyed(2), _held_token)
    assert held and while_held == 0
    assert sealed == 1  # token and data: one frame, one datagram
    assert token and ok


def _take_flushes(comm: Communicator) -> Any:
    backend = comm.engine
    dl = Deadline.start(10.0, "test", comm.rank)
    env = backend.envelope("test", 1, 0)  # type: ignore[attr-defined]
    # Each rank holds a token, then waits for the other's: the take must send its own first.
    backend._post_soon(1 - comm.rank, AGREEMENT_CHANNEL, env, TOKEN, dl)  # type: ignore[attr-defined]
    got_env, _ = backend._take(1 - comm.rank, AGREEMENT_CHANNEL, dl)  # type: ignore[attr-defined]
    return got_env == env


def test_a_take_sends_what_was_held_before_it_waits() -> None:
    assert run_world(2, keyed(2), _take_flushes) == [True, True]


def _rooted_ops(comm: Communicator) -> Any:
    out = []
    for i in range(30):
        t = torch.full((64,), float(i)) if comm.rank == i % comm.size else torch.zeros(64)
        comm.broadcast_into(t, root=i % comm.size)
        out.append(bool((t == float(i)).all()))
    return all(out)


@pytest.mark.parametrize("n", [2, 3])
def test_rooted_ops_with_held_tokens_keep_their_order(n: int) -> None:
    assert all(run_world(n, keyed(n), _rooted_ops))


# -- the seam ------------------------------------------------------------------------------------
class _Recorder(P2PBackend):
    name = "recorder"

    def __init__(self) -> None:
        super().__init__(0, 2)
        self.calls: list[str] = []

    def _post(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        self.calls.append(f"post {channel}")

    def _post_soon(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        self.calls.append(f"soon {channel}")

    def _flush(self) -> None:
        self.calls.append("flush")

    def _take(
        self, src: int, channel: str, dl: Deadline, into: memoryview | None = None
    ) -> tuple[Envelope, Encoded]:
        raise AssertionError("not reached")

    def _has_message(self, src: int, channel: str) -> bool:
        return False

    @classmethod
    def create(cls, config: Any) -> _Recorder:
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_failed_rooted_body_still_sends_the_first_token() -> None:
    backend = _Recorder()
    ctx = OpContext("broadcast", 1, Deadline.start(5.0, "broadcast", 0))
    with pytest.raises(ValueError), _Agreement(backend._link(ctx, 0)):
        raise ValueError("the body failed")
    assert backend.calls == [f"soon {AGREEMENT_CHANNEL}", "flush"]


def _landed(out: torch.Tensor, sent: torch.Tensor) -> tuple[Encoded, memoryview]:
    into = byte_view(out)
    assert into is not None
    into[:] = sent.numpy().tobytes()
    return Encoded(encode(sent).header, [into]), into


def test_a_landed_block_under_a_known_header_is_still_held_to_the_buffer() -> None:
    ctx = OpContext("recv", 0, Deadline.start(5.0, "recv", 0))
    sent = torch.arange(16, dtype=torch.float32)
    out = torch.zeros(16, dtype=torch.float32)
    msg, into = _landed(out, sent)
    for _ in range(2):  # the second goes through the cache
        place_block(out, msg, 1, ctx, codec=DEFAULT, into=into)
        assert torch.equal(out, sent)
    # The same header bytes landed in a buffer of another dtype (same size): refused.
    other = torch.zeros(16, dtype=torch.int32)
    other_into = byte_view(other)
    assert other_into is not None
    bad = Encoded(msg.header, [other_into])
    with pytest.raises(CollectiveMismatchError, match="float32"):
        place_block(other, bad, 1, ctx, codec=DEFAULT, into=other_into)


def _own_views(comm: Communicator) -> Any:
    backend = comm.engine
    engine = backend._engine  # type: ignore[attr-defined]
    dl = Deadline.start(10.0, "test", comm.rank)
    env = backend.envelope("test", 1, 0)  # type: ignore[attr-defined]
    sent = torch.arange(256, dtype=torch.float32)
    comm.barrier()
    if comm.rank == 0:
        backend._post(1, COLLECTIVE_CHANNEL, env, encode(sent), dl)  # type: ignore[attr-defined]
        time.sleep(0.3)  # rank 1 waits for the second one meanwhile: it lands
        backend._post(1, COLLECTIVE_CHANNEL, env, encode(sent), dl)  # type: ignore[attr-defined]
        comm.barrier()
        return None
    out = []
    for pause in (0.2, 0.0):  # arrived before the take (copied in), then landed while it waits
        time.sleep(pause)
        block = torch.zeros(256, dtype=torch.float32)
        into = byte_view(block)
        before = engine.stats()["landed"]
        _, msg = backend._take(0, COLLECTIVE_CHANNEL, dl, into)  # type: ignore[attr-defined]
        landed = engine.stats()["landed"] - before
        place_block(block, msg, 0, OpContext("t", 1, dl), codec=backend.codec, into=into)
        out.append((landed, msg.buffers[0] is into, torch.equal(block, sent)))
    comm.barrier()
    return out


def test_a_receive_into_a_buffer_gets_that_buffer_back() -> None:
    # Its own view, not a slice of it: that is how place_block knows the block is in place
    # and skips the decode (a slice cost every landed small receive a decode).
    _, got = run_world(2, keyed(2), _own_views)
    assert got == [(0, True, True), (1, True, True)]


def _quiet_after_a_long_take(comm: Communicator) -> Any:
    backend = comm.engine
    engine = backend._engine  # type: ignore[attr-defined]
    dl = Deadline.start(10.0, "test", comm.rank)
    env = backend.envelope("test", 1, 0)  # type: ignore[attr-defined]
    comm.barrier()
    if comm.rank == 1:
        # A take long enough for the IO thread to park until it ends, then silence: only the
        # IO thread can acknowledge what comes next.
        backend._take(0, COLLECTIVE_CHANNEL, dl)  # type: ignore[attr-defined]
        time.sleep(1.5)
        comm.barrier()
        return None
    time.sleep(0.3)
    backend._post(1, COLLECTIVE_CHANNEL, env, encode(b"first"), dl)  # type: ignore[attr-defined]
    time.sleep(0.05)  # rank 1 has left its take
    start = time.monotonic()
    mid = engine.send(1, 99, b"", [memoryview(b"second")])  # a channel nobody takes
    engine.wait_sent(1, mid, dl)
    elapsed = time.monotonic() - start
    comm.barrier()
    return elapsed


def test_a_rank_that_goes_quiet_after_a_long_take_still_acknowledges() -> None:
    # The IO thread parks for a long drive and must be handed the rank when it ends (its next
    # look would be a second later otherwise); the ACK comes within a few milliseconds.
    elapsed, _ = run_world(2, keyed(2), _quiet_after_a_long_take)
    assert elapsed < 0.3


def test_waits_poll_with_yields_where_loopback_ranks_outnumber_the_cpus() -> None:
    import os

    cpus = len(os.sched_getaffinity(0))
    assert udp_wait.spin_budget("127.0.0.1", cpus + 1) == (udp_wait._YIELD_SPIN_S, True)
    assert udp_wait.spin_budget("127.0.0.1", 1) == (udp_wait._SPIN_S, False)
    assert udp_wait.spin_budget("10.0.0.5", cpus + 1) == (udp_wait._SPIN_S, False)
