"""The request/reply bookkeeping shared by the control carriers: each request runs once, whichever
carrier (or how many times) it arrived through; a repeat of an answered one gets the same reply."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from comfy_nodes.server.exchange import Exchange
from comfy_nodes.server.seal import Envelope


def _wait(event: threading.Event) -> None:
    assert event.wait(5.0)


def test_a_request_arriving_twice_runs_once_and_both_get_the_same_reply() -> None:
    ran: list[dict[str, Any]] = []
    release = threading.Event()

    def handler(envelope: Envelope, source: tuple[str, int]) -> dict[str, Any]:
        ran.append(envelope.body)
        release.wait(5.0)
        return {"ok": True, "n": len(ran)}

    exchange = Exchange(0, handler)
    replies: list[tuple[str, dict[str, Any]]] = []
    answered = threading.Event()

    def answer_via(path: str) -> Any:
        def answer(request: Envelope, body: dict[str, Any]) -> None:
            replies.append((path, body))
            answered.set()

        return answer

    request = Envelope(1, "m1", "epoch", False, {"x": 1})
    exchange.requested(request, ("127.0.0.1", 9), answer_via("udp"))
    exchange.requested(request, ("mailbox", 0), answer_via("mailbox"))  # while it runs: ignored
    release.set()
    _wait(answered)
    answered.clear()
    exchange.requested(request, ("mailbox", 0), answer_via("mailbox"))  # answered: same reply
    _wait(answered)
    exchange.close()
    assert ran == [{"x": 1}]
    assert replies == [("udp", {"ok": True, "n": 1}), ("mailbox", {"ok": True, "n": 1})]


def test_call_returns_the_reply_or_raises_the_carriers_error() -> None:
    exchange = Exchange(0, lambda e, s: {})
    sent: list[str] = []

    def send(msg_id: str) -> None:
        sent.append(msg_id)
        if len(sent) == 2:  # the reply comes after one retransmission
            exchange.replied(Envelope(1, msg_id, "epoch", True, {"epoch": 3}))

    closed = threading.Event()
    reply = exchange.call(
        send, 5.0, retry_s=0.01, max_retry_s=0.02, closed=closed,
        unreachable=lambda: AssertionError("unreachable"),
    )  # fmt: skip
    assert reply == {"epoch": 3} and len(set(sent)) == 1  # one message id, sent twice
    with pytest.raises(TimeoutError, match="rank 1"):
        exchange.call(
            lambda msg_id: None, 0.05, retry_s=0.01, max_retry_s=0.02, closed=closed,
            unreachable=lambda: TimeoutError("rank 1 did not answer"),
        )  # fmt: skip
    exchange.close()


def test_a_failing_handler_answers_with_its_error() -> None:
    def handler(envelope: Envelope, source: tuple[str, int]) -> dict[str, Any]:
        raise ValueError("bad body")

    exchange = Exchange(0, handler)
    got: list[dict[str, Any]] = []
    done = threading.Event()
    exchange.requested(
        Envelope(1, "m2", "abort", False, {}), ("127.0.0.1", 9),
        lambda request, body: (got.append(body), done.set()),
    )  # fmt: skip
    _wait(done)
    exchange.close()
    assert got == [{"ok": False, "error": "ValueError: bad body"}]
