"""``create_app(settings)``: the FastAPI app, its UDP port and its housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import routes_compat, routes_v1
from .auth import KeyHasher
from .limits import BodyLimitMiddleware, KeyedLimiter, RateLimitMiddleware
from .models import HealthResponse
from .registry import Clock, Registry
from .settings import Settings
from .state import ServerState
from .udp_core import UdpCore
from .udp_server import UdpServer

VERSION = "1"
log = logging.getLogger("comfycluster.stun")


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> FastAPI:
    """The server.  ``clock`` (seconds, monotonic) replaces the real one in tests of expiry.

    The UDP port and the expiry task start with the app's lifespan (under uvicorn); without it
    (httpx's ASGI transport) the HTTP API works alone and expiry happens on access."""
    settings = settings if settings is not None else Settings.from_env()
    clock = clock if clock is not None else time.monotonic
    store = None
    hasher = KeyHasher()
    if settings.db_path:
        from .persist import SqliteStore

        store = SqliteStore(settings.db_path)
        hasher = KeyHasher(store.salt(hasher.salt))
    registry = Registry(
        ttl_s=settings.ttl_s,
        max_instances=settings.max_instances_per_cluster,
        default_world_size=settings.world_size,
        clock=clock,
        store=store,
    )
    for cluster_id, key in settings.cluster_keys.items():
        registry.add_cluster(cluster_id, hasher.digest(key), declared=True)
    if store is not None:
        log.info("restored %d members from %s", store.load(registry), settings.db_path)
    state = ServerState(
        settings=settings,
        registry=registry,
        hasher=hasher,
        cluster_limiter=KeyedLimiter(
            settings.rate_per_cluster, 2 * settings.rate_per_cluster, clock
        ),
        store=store,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.udp_port is not None:
            core = UdpCore(
                registry,
                max_datagram=settings.max_datagram_bytes,
                relay_pps=settings.relay_pps_per_instance,
                stun_pps=settings.stun_pps_per_ip,
                post=lambda fn: fn(),
            )
            state.udp = UdpServer(
                core, settings.udp_host or settings.host, settings.udp_port, settings.udp_mode
            )
            await state.udp.start()
        sweeper = asyncio.create_task(_sweep(registry, settings.cleanup_interval_s))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            if state.udp is not None:
                await state.udp.stop()
            if store is not None:
                store.close()

    app = FastAPI(
        title="comfycluster-stun",
        version=VERSION,
        description="Rendezvous server of ComfyUI Cluster: see docs/rendezvous-protocol.md.",
        lifespan=lifespan,
    )
    app.state.stun = state
    app.include_router(routes_v1.router)
    app.include_router(routes_compat.router)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        """Liveness (no authentication, no cluster information)."""
        return HealthResponse(
            status="ok",
            version=VERSION,
            uptime_s=round(time.monotonic() - state.started, 3),
            udp_port=state.udp.port if state.udp is not None else None,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic's errors without the offending input: it may hold a cluster key
        errors: list[dict[str, Any]] = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    # outermost first: the rate limit answers before the body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        RateLimitMiddleware,
        limiter=KeyedLimiter(settings.rate_per_ip, 2 * settings.rate_per_ip, clock),
    )
    return app


async def _sweep(registry: Registry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(max(0.05, min(interval_s, registry.ttl_s / 2)))
        removed = registry.expire()
        if removed:
            log.info("expired %d members", removed)
