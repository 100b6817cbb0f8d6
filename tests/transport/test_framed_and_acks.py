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


def test_message_end_ack_waits_briefly_and_then_goes() -> None:
    mesh = Mesh(2)
    for _ in range(50):  # connect; the handshake traffic settles (no timer fires yet)
        mesh.step()
    mesh.endpoints[0].send(1, 0, b"m", [memoryview(b"x" * 100)], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(1, MessageReceived)))
    got_at = mesh.now
    before = mesh.endpoints[1].stats()["datagrams_out"]
    mesh.step()
    assert mesh.endpoints[1].stats()["datagrams_out"] == before  # no ACK at once
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)), max_time=got_at + 0.1)
    # Within the message-end delay (0.5 ms), well inside max_ack_delay.
    assert mesh.now - got_at <= 0.001 < TransportConfig().max_ack_delay


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
