"""Limits on what one client can cost the server: body size and request rate.

Both are plain ASGI middleware (no Starlette ``BaseHTTPMiddleware``, which would buffer bodies
and cost a task per request).  The body limit counts bytes as they arrive, so a chunked body
without a ``Content-Length`` is cut off at the limit too, before the app ever parses it.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_TRACKED_KEYS = 65_536  # buckets kept; the least recently used is dropped beyond this


class KeyedLimiter:
    """Token buckets, one per key (client address, cluster, relay source)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict[Any, tuple[float, float]] = OrderedDict()

    def allow(self, key: Any) -> float:
        """0.0 when a request may pass (and take a token), else the seconds until one may."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, stamp = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        if len(self._buckets) > MAX_TRACKED_KEYS:
            self._buckets.popitem(last=False)
        return wait


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[Any]) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class _TooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing passes it on as a 413 rather than
    turning it into a generic 400; outside a route the middleware answers it itself."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large(max_bytes), {"connection": "close"})


def _too_large(max_bytes: int) -> str:
    return f"request body over {max_bytes} bytes (COMFY_CLUSTER_STUN_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.max_bytes + 1
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        detail = _too_large(self.max_bytes)
        await send_json(send, 413, {"detail": detail}, [(b"connection", b"close")])


class RateLimitMiddleware:
    """Per client address.  Behind a reverse proxy, uvicorn's ``--proxy-headers`` (on by
    default for 127.0.0.1) makes the address the proxy's ``X-Forwarded-For``."""

    def __init__(self, app: ASGIApp, limiter: KeyedLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self.limiter.allow(client[0] if client else "?")
        if wait > 0:
            await send_json(
                send,
                429,
                {"detail": "too many requests from this address (COMFY_CLUSTER_STUN_RATE_PER_IP)"},
                [(b"retry-after", str(max(1, math.ceil(wait))).encode())],
            )
            return
        await self.app(scope, receive, send)
