"""The request/reply bookkeeping every control carrier shares, whatever moves its bytes.

A carrier (comfy_nodes.server.carrier's UDP one, carrier_mailbox's) only sends sealed envelopes
and hands over the ones it opened; :class:`Exchange` does the rest:

* :meth:`Exchange.call` sends a request under a fresh message id, sends it again (a fresh seal
  each time: the receiver refuses a nonce it has opened) every retry interval, doubling, until
  its reply arrives or the timeout passes;
* :meth:`Exchange.replied` wakes the caller waiting for a reply;
* :meth:`Exchange.requested` runs each request once, on a small thread pool (a handler that asks
  another rank something never blocks a receive loop): a repeat of one being handled is ignored,
  a repeat of one already answered gets the same reply body again (the last
  :data:`REPLIES_KEPT`).

One exchange may serve several carriers (the UDP one and the mailbox behind it): a request that
reached its peer both ways then still runs once.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from comfy_nodes.server.seal import Envelope

log = logging.getLogger("comfy_cluster")

Address = tuple[str, int]
Handler = Callable[[Envelope, Address], dict[str, Any]]
"""Answers one authentic request (its reply body); the address is where it came from."""
Answer = Callable[[Envelope, dict[str, Any]], None]
"""Sends the reply ``body`` to the request ``envelope`` (the carrier's way)."""

REPLIES_KEPT = 1024


class Exchange:
    """Requests in flight and requests answered (see the module's docstring)."""

    def __init__(self, rank: int, handler: Handler) -> None:
        self.rank = rank
        self._handler = handler
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._handling: set[tuple[int, str]] = set()
        self._answered: OrderedDict[tuple[int, str], bytes] = OrderedDict()  # replies' JSON
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cluster-ctl")

    def call(
        self,
        send: Callable[[str], None],
        timeout: float,
        *,
        retry_s: float,
        max_retry_s: float,
        closed: threading.Event,
        unreachable: Callable[[], Exception],
    ) -> dict[str, Any]:
        """``send(msg_id)`` until the reply to ``msg_id`` comes (its body), or raise
        ``unreachable()`` once ``timeout`` has passed (or the carrier is closed)."""
        msg_id = secrets.token_hex(8)
        done, box = threading.Event(), list[dict[str, Any]]()
        with self._lock:
            self._waiting[msg_id] = (done, box)
        deadline, pause = time.monotonic() + timeout, retry_s
        try:
            while True:
                send(msg_id)
                remaining = deadline - time.monotonic()
                if done.wait(min(pause, max(remaining, 0.0))):
                    return box[0]
                if time.monotonic() >= deadline or closed.is_set():
                    raise unreachable()
                pause = min(pause * 2, max_retry_s)
        finally:
            with self._lock:
                self._waiting.pop(msg_id, None)

    def replied(self, envelope: Envelope) -> None:
        with self._lock:
            waiting = self._waiting.get(envelope.msg_id)
        if waiting is not None and not waiting[0].is_set():
            waiting[1].append(envelope.body)
            waiting[0].set()

    def requested(self, envelope: Envelope, source: Address, answer: Answer) -> None:
        key = (envelope.sender, envelope.msg_id)
        with self._lock:
            encoded = self._answered.get(key)
            busy = key in self._handling
            if encoded is None and not busy:
                self._handling.add(key)
        if encoded is not None:  # a repeat: its reply was lost; the same reply again
            self._pool.submit(answer, envelope, json.loads(encoded))
        elif not busy:
            self._pool.submit(self._handle, envelope, source, answer)

    def _handle(self, envelope: Envelope, source: Address, answer: Answer) -> None:
        key = (envelope.sender, envelope.msg_id)
        try:
            body = self._handler(envelope, source)
        except Exception as err:  # a bug in a handler must not leave the sender retrying
            log.exception("control %s from rank %d", envelope.kind, envelope.sender)
            body = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        encoded = json.dumps(body, separators=(",", ":")).encode()  # kept immutable
        with self._lock:
            self._handling.discard(key)
            self._answered[key] = encoded
            while len(self._answered) > REPLIES_KEPT:
                self._answered.popitem(last=False)
        answer(envelope, json.loads(encoded))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
