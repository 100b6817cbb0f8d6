"""What one server process holds, and the authorization step every cluster route shares."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

from .auth import KeyHasher, unauthorized
from .limits import KeyedLimiter
from .registry import Cluster, Registry
from .settings import MIN_OPEN_KEY_CHARS, Settings

if TYPE_CHECKING:
    from .persist import SqliteStore
    from .udp_server import UdpServer

cluster_key_header = APIKeyHeader(name="X-Cluster-Key", auto_error=False)
admin_key_header = APIKeyHeader(name="X-Admin-Key", auto_error=False)


@dataclass
class ServerState:
    settings: Settings
    registry: Registry
    hasher: KeyHasher
    cluster_limiter: KeyedLimiter
    store: SqliteStore | None = None
    udp: UdpServer | None = None
    started: float = field(default_factory=time.monotonic)

    def authorize(self, cluster_id: str, key: str | None, *, may_create: bool = False) -> Cluster:
        """The cluster, if ``key`` is its key; else the one 401 every failure gets.

        ``may_create``: a join under open registration creates an unknown cluster."""
        cluster = self.registry.clusters.get(cluster_id)
        if cluster is not None and may_create and not cluster.declared:
            # an abandoned registration-created cluster is forgotten before a join may retake it
            self.registry.expire_cluster(cluster)
            cluster = self.registry.clusters.get(cluster_id)
        if cluster is None and may_create and self.settings.open_registration:
            return self._create(cluster_id, key)
        if not self.hasher.matches(cluster.key_hash if cluster else None, key):
            raise unauthorized()
        assert cluster is not None  # matches() is False without a stored hash
        wait = self.cluster_limiter.allow(cluster_id)
        if wait > 0:
            raise HTTPException(
                429,
                "too many requests for this cluster (COMFY_CLUSTER_STUN_RATE_PER_CLUSTER)",
                {"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        return cluster

    def _create(self, cluster_id: str, key: str | None) -> Cluster:
        if key is None or len(key) < MIN_OPEN_KEY_CHARS:
            raise HTTPException(
                400,
                f"a cluster key of at least {MIN_OPEN_KEY_CHARS} characters is needed to "
                "create a cluster (X-Cluster-Key)",
            )
        if len(self.registry.clusters) >= self.settings.max_clusters:
            raise HTTPException(
                409, "the server holds its maximum of clusters (COMFY_CLUSTER_STUN_MAX_CLUSTERS)"
            )
        return self.registry.add_cluster(cluster_id, self.hasher.digest(key), declared=False)


async def get_state(request: Request) -> ServerState:
    # async: a plain def dependency would cost a worker-thread round trip per request
    state: ServerState = request.app.state.stun
    return state


State = Annotated[ServerState, Depends(get_state)]
ClusterKey = Annotated[str | None, Depends(cluster_key_header)]
AdminKey = Annotated[str | None, Depends(admin_key_header)]
