"""MessageFramed (a sender's buffers free once sealed) and how ACKs ride on data frames."""

from __future__ import annotations

import random

from collectives.transport import MessageFramed, MessageReceived, MessageSent, TransportConfig
from tests.transport.pairs import Mesh


def test_framed_comes_before_sent_and_the_body_is_free_then() -> None:
    mesh = Mesh(2)
    body = bytearray(random.Random(1).randbytes(3_000_000))
    original = bytes(body)
    mid = mesh.endpoints[0].send(1, 0, b"m", [memoryview(body)], mesh.now, notify_framed=True)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageFramed)))
    assert mesh.of(0, MessageFramed) == [MessageFramed(1, mid)]
    body[:] = bytes(len(body))  # the caller reuses its buffer: resends use the sealed frames
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)))
    [msg] = mesh.of(1, MessageReceived)
    assert msg.body == original
    order = [e for e in mesh.events[0] if isinstance(e, MessageFramed | MessageSent)]
    assert order == [MessageFramed(1, mid), MessageSent(1, mid)]


def test_framed_only_when_asked() -> None:
    mesh = Mesh(2)
    mesh.endpoints[0].send(1, 0, b"m", [memoryview(b"x" * 1000)], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)))
    assert mesh.of(0, MessageFramed) == []


def test_small_message_acks_are_batched_within_max_ack_delay() -> None:
    mesh = Mesh(2)
    for _ in range(50):  # connect; the handshake traffic settles (no timer fires yet)
        mesh.step()
    a, b = mesh.endpoints
    for i in range(3):  # eager posts: their sender does not wait for the ACK
        a.send(1, 0, b"m", [memoryview(bytes([i]) * 100)], mesh.now)
        assert mesh.run_until(lambda n=i + 1: len(mesh.of(1, MessageReceived)) == n)
    got_at = mesh.now
    before = b.stats()["datagrams_out"]
    mesh.step()
    assert b.stats()["datagrams_out"] == before  # no ACK at once
    assert mesh.run_until(lambda: len(mesh.of(0, MessageSent)) == 3, max_time=got_at + 0.1)
    # One ACK for the three messages, within max_ack_delay.
    assert b.stats()["datagrams_out"] == before + 1
    assert mesh.now - got_at <= TransportConfig().max_ack_delay + 0.001


def test_the_sender_gets_an_ack_at_once_when_it_asks() -> None:
    mesh = Mesh(2)
    for _ in range(50):
        mesh.step()
    a = mesh.endpoints[0]
    a.send(1, 0, b"m", [memoryview(b"x" * 100)], mesh.now)  # (the handshake's ACK settles)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)), max_time=mesh.now + 0.1)
    a.send(1, 0, b"m", [memoryview(b"x" * 100)], mesh.now)
    assert mesh.run_until(lambda: len(mesh.of(1, MessageReceived)) == 2)
    a.request_acks(mesh.now)  # a closing driver: it waits for every MessageSent
    start = mesh.now
    assert mesh.run_until(lambda: len(mesh.of(0, MessageSent)) == 2, max_time=start + 0.1)
    assert mesh.now - start < 0.001 < TransportConfig().max_ack_delay


def test_a_gap_is_acknowledged_at_once() -> None:
    dropped: list[int] = []

    def drop_second_data(src: int, dst: int, data: bytes) -> list[bytes]:
        if src == 0 and len(data) > 150 and not dropped and sent[0] == 2:
            dropped.append(1)
            return []
        return [data]

    sent = [0]
    mesh = Mesh(2, tamper=drop_second_data)
    for _ in range(50):
        mesh.step()
    a = mesh.endpoints[0]
    for i in range(3):
        sent[0] = i + 1
        a.send(1, 0, b"m", [memoryview(bytes([i]) * 200)], mesh.now)
        for _ in range(5):
            mesh.step()
    assert dropped
    # The third frame arrived after a gap: the receiver acknowledges at once, so the sender
    # detects the loss (packet or time threshold) without waiting max_ack_delay.
    start = mesh.now
    assert mesh.run_until(lambda: len(mesh.of(1, MessageReceived)) == 3, max_time=start + 1.0)
    assert a.stats()["lost_segments"] >= 1
    assert mesh.now - start < TransportConfig().max_ack_delay


def test_ack_rides_on_the_reply() -> None:
    mesh = Mesh(2)
    for _ in range(50):  # connect; the handshake traffic settles (no timer fires yet)
        mesh.step()
    a, b = mesh.endpoints
    a.send(1, 0, b"q", [memoryview(b"x" * 100)], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(1, MessageReceived)))
    before = b.stats()["frames_sealed"]
    b.send(0, 0, b"r", [memoryview(b"y" * 100)], mesh.now)  # the reply, at once
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)))
    # One frame carried the reply and the ACK: no separate ACK frame was needed for the query.
    assert b.stats()["frames_sealed"] == before + 1


def test_a_window_limited_sender_asks_for_an_ack_at_once() -> None:
    mesh = Mesh(2, tick=1e-4)
    assert mesh.run_until(lambda: len(mesh.of(0, object)) > 0 and len(mesh.of(1, object)) > 0)
    mesh.run_until(lambda: False, max_time=mesh.now + 0.2)  # settle the handshake's ACKs
    a = mesh.endpoints[0]
    out = a._sessions[1].out
    assert out is not None
    # A window that holds this frame but not a next one: the next small message would wait
    # for the ACK of this one, so this frame asks for it (a PING) instead of letting the
    # receiver delay it max_ack_delay.
    a.send(1, 0, b"m", [memoryview(b"x" * 100)], mesh.now)  # (the handshake's ACK settles)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)), max_time=mesh.now + 0.1)
    out.recovery.congestion.cwnd = 70_000
    start = mesh.now
    a.send(1, 0, b"m", [memoryview(b"x" * 100)], mesh.now)
    assert mesh.run_until(lambda: len(mesh.of(0, MessageSent)) == 2, max_time=start + 0.1)
    assert mesh.now - start < 0.002 < TransportConfig().max_ack_delay
