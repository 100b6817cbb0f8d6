"""Where the other ranks' control endpoints are, and this rank's requests to them.

A follower knows the leader's endpoint from its settings (``COMFY_CLUSTER_LEADER_CONTROL``, by
default the host and port of ``COMFY_CLUSTER_LEADER_URL``, on UDP).  The leader learns each
follower's when a world forms (every rank shares its endpoint in the join) and from every
authentic message a follower sends (a restarted follower asking for the epoch): so the leader
can announce the next world to a follower that is not in the current one.

Requests go through a :class:`~comfy_nodes.server.carrier.Carrier`; until one is attached
(unit tests, a ComfyUI not yet started) a request fails at once with a clear error.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from comfy_nodes.server.carrier import Address, Carrier, ControlUnreachableError
from comfy_nodes.server.seal import MAX_REASON_CHARS

log = logging.getLogger("comfy_cluster")


class ControlRefusedError(RuntimeError):
    """A rank answered a control request with a refusal (its reason is the message)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class Peers:
    """This rank's address book of control endpoints, and its requests to them."""

    def __init__(
        self,
        rank: int,
        book: dict[int, Address] | None = None,
        *,
        carrier: Carrier | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.rank = rank
        self.carrier = carrier
        self.fingerprint = fingerprint  # the cluster key's public fingerprint, or None
        self._book: dict[int, Address] = dict(book or {})
        self._lock = threading.Lock()

    def address(self, rank: int) -> Address | None:
        with self._lock:
            return self._book.get(rank)

    def learn(self, rank: int, address: Address) -> None:
        if rank != self.rank:
            with self._lock:
                self._book[rank] = address

    def others(self) -> dict[int, Address]:
        """Every other rank whose endpoint is known, by rank."""
        with self._lock:
            return {r: a for r, a in sorted(self._book.items()) if r != self.rank}

    def request(self, rank: int, kind: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """``rank``'s reply; :class:`ControlUnreachableError` (no answer, or no known endpoint)
        or :class:`ControlRefusedError` (it refused)."""
        address = self.address(rank)
        if self.carrier is None or address is None:
            why = "no control channel" if self.carrier is None else "its endpoint is unknown"
            raise ControlUnreachableError(f"cannot send {kind!r} to rank {rank}: {why}", rank)
        reason = body.get("reason")
        if isinstance(reason, str) and len(reason) > MAX_REASON_CHARS:
            body = {**body, "reason": reason[: MAX_REASON_CHARS - 3] + "..."}
        reply = self.carrier.request(rank, address, kind, body, timeout)
        if not reply.get("ok"):
            raise ControlRefusedError(
                f"rank {rank} refused {kind!r}: {reply.get('error', 'no reason given')}", rank
            )
        return reply

    def send_async(
        self, rank: int, kind: str, body: dict[str, Any], timeout: float = 30.0
    ) -> threading.Thread:
        """:meth:`request` in the background (retried until ``timeout``); a refusal or silence
        is logged."""

        def send() -> None:
            try:
                self.request(rank, kind, body, timeout)
            except (ControlUnreachableError, ControlRefusedError) as err:
                log.warning("%s", err)

        thread = threading.Thread(target=send, name="cluster-notify", daemon=True)
        thread.start()
        return thread
