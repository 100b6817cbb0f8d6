"""Requests between the ranks' ComfyUI servers: signed with the cluster key, checked on arrival.

Every request a rank makes to another (membership and abort messages, the epoch query) carries a
credential (:data:`collectives.auth.AUTH_HEADER`: a MAC over method, path, body and time, under a
subkey of ``COMFY_CLUSTER_KEY``), and the receiving route refuses a request whose credential is
missing (401), wrong, expired or replayed (403) before it reads the body.  POST bodies also name
the sender's rank, under the same MAC, so a receiver knows who may have sent it.

Without a key (only possible on loopback, or with ``COMFY_CLUSTER_INSECURE=1``: see
:func:`collectives.auth.require_key`) nothing is signed and every request is accepted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from collectives.auth import AUTH_HEADER, ClusterKey, RequestSigner, RequestVerifier
from collectives.errors import AuthenticationError

log = logging.getLogger("comfy_cluster")

MAX_REASON_CHARS = 4000
"""The longest ``reason`` a control route takes (comfy_nodes.server.routes refuses longer ones
with 400, which is not retried): senders clip theirs to it."""

WINDOW_S = 30.0
"""How far apart the ranks' clocks may be (and how long a captured request could be replayed,
were nonces not remembered)."""


class PeerAuth:
    """Signs this rank's requests and checks the ones it receives (a no-op without a key)."""

    def __init__(self, key: ClusterKey | None, window_s: float = WINDOW_S) -> None:
        self.key = key
        self._signer = RequestSigner(key) if key is not None else None
        self._verifier = RequestVerifier(key, window_s) if key is not None else None

    @property
    def fingerprint(self) -> str | None:
        """The key's public fingerprint (for comparing keys in status and logs), or None."""
        return self.key.fingerprint() if self.key is not None else None

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        if self._signer is None:
            return {}
        return {AUTH_HEADER: self._signer.sign(method, path, body)}

    def refusal(
        self, method: str, path: str, body: bytes, header: str | None
    ) -> tuple[int, str] | None:
        """None if the request may proceed, else the HTTP status (401, 403) and why."""
        if self._verifier is None:
            return None
        if not header:
            return 401, f"{path} needs the cluster's {AUTH_HEADER} credential"
        try:
            self._verifier.verify(method, path, body, header)
        except AuthenticationError as err:
            return 403, str(err)
        return None


class PeerClient:
    """This rank's requests to the other ranks, signed, with its rank in every POST body."""

    def __init__(self, auth: PeerAuth, rank: int) -> None:
        self.auth = auth
        self.rank = rank

    def get_json(self, base_url: str, path: str, timeout: float) -> Any:
        """One signed GET; raises ``OSError`` (HTTP errors included) or ``ValueError``."""
        req = urllib.request.Request(
            base_url + path, headers=self.auth.headers("GET", path, b""), method="GET"
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)

    def post_async(
        self, base_url: str, path: str, body: dict[str, Any], attempts: int = 20
    ) -> threading.Thread:
        """POST ``body`` (plus this rank) in the background; retried while the peer is
        unreachable or failing (5xx), not when it refuses (4xx: logged).  A ``reason`` longer
        than the routes take is clipped."""
        reason = body.get("reason")
        if isinstance(reason, str) and len(reason) > MAX_REASON_CHARS:
            body = {**body, "reason": reason[: MAX_REASON_CHARS - 3] + "..."}
        data = json.dumps({**body, "rank": self.rank}).encode()

        def send() -> None:
            for _ in range(attempts):
                # A fresh credential per attempt: the receiver refuses a nonce it has seen.
                headers = {
                    "Content-Type": "application/json",
                    **self.auth.headers("POST", path, data),
                }
                req = urllib.request.Request(base_url + path, data=data, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=5):
                        return
                except urllib.error.HTTPError as err:
                    if err.code < 500:
                        detail = err.read(500).decode("utf-8", "replace")
                        log.warning("%s%s refused (%d): %s", base_url, path, err.code, detail)
                        return
                except OSError:
                    pass
                time.sleep(0.5)
            log.warning("could not reach %s%s", base_url, path)

        thread = threading.Thread(target=send, name="cluster-notify", daemon=True)
        thread.start()
        return thread
