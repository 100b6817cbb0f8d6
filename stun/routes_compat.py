"""The original ComfyUI_Cluster server's routes, so that its instances register here unchanged.

Its client puts the cluster key in the registration body and ``X-Cluster-Key`` on the other
routes, numbers instances 0, 1, ... and reads ``instances[]`` with ``instance_id``, ``address``,
``direct_listen_port`` and ``role``.  An original instance ``n`` is a member with instance id
``"n"`` claiming rank ``n``; members that joined through ``/v1`` appear here under their rank.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from .auth import UNAUTHORIZED_DETAIL
from .models import (
    CompatInstance,
    CompatInstances,
    CompatRegistered,
    CompatRegistration,
    CompatStatus,
)
from .registry import Cluster, RegistryError
from .settings import ID_PATTERN
from .state import ClusterKey, ServerState, State

ClusterId = Annotated[str, Path(pattern=ID_PATTERN)]
InstanceNumber = Annotated[int, Path(ge=0, le=65535)]

router = APIRouter(
    tags=["original ComfyUI_Cluster API"],
    responses={401: {"description": UNAUTHORIZED_DETAIL}},
)


def _instances(state: ServerState, cluster: Cluster) -> list[CompatInstance]:
    registry = state.registry
    registry.expire_cluster(cluster)
    now, wall = registry.clock(), time.time()
    out = []
    for member in sorted(cluster.members.values(), key=lambda m: m.rank):
        addr = member.local[0] if member.local else member.reflexive
        if addr is None:
            continue  # nothing an original client could dial
        seen = wall - max(0.0, now - member.last_seen)
        out.append(
            CompatInstance(
                instance_id=member.rank,
                address=addr[0],
                direct_listen_port=addr[1],
                role=member.role or "follower",
                last_seen=seen,
                last_ping=datetime.fromtimestamp(seen, timezone.utc)
                .isoformat()
                .replace("+00:00", "Z"),
            )
        )
    return out


@router.post("/register-instance", response_model=CompatRegistered)
async def register_instance(
    body: CompatRegistration, state: State, header_key: ClusterKey
) -> CompatRegistered:
    """Register an original instance (key in the body, as its client sends it)."""
    key = body.cluster_key if body.cluster_key is not None else header_key
    cluster = state.authorize(body.cluster_id, key, may_create=True)
    try:
        state.registry.join(
            cluster,
            str(body.instance_id),
            rank=body.instance_id,
            world_size=None,
            local=[(body.address, body.direct_listen_port)],
            role=body.role,
        )
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    instances = _instances(state, cluster)
    return CompatRegistered(
        status="registered",
        instance_count=len(instances),
        instance_id=body.instance_id,
        instances=instances,
    )


@router.get("/instances/{cluster_id}", response_model=CompatInstances)
async def get_instances(cluster_id: ClusterId, state: State, key: ClusterKey) -> CompatInstances:
    """Every live instance of the cluster."""
    cluster = state.authorize(cluster_id, key)
    return CompatInstances(
        cluster_id=cluster_id,
        instances=_instances(state, cluster),
        last_change_time=time.time(),
    )


@router.post("/heartbeat/{cluster_id}/{instance_id}", response_model=CompatStatus)
async def heartbeat(
    cluster_id: ClusterId, instance_id: InstanceNumber, state: State, key: ClusterKey
) -> CompatStatus:
    """Keep an original instance alive; 404 once it has expired."""
    cluster = state.authorize(cluster_id, key)
    try:
        state.registry.heartbeat(cluster, str(instance_id), None)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return CompatStatus(status="ok", instance_id=instance_id)


@router.delete("/instance/{cluster_id}/{instance_id}", response_model=CompatStatus)
async def remove_instance(
    cluster_id: ClusterId, instance_id: InstanceNumber, state: State, key: ClusterKey
) -> CompatStatus:
    """Remove an original instance."""
    cluster = state.authorize(cluster_id, key)
    if not state.registry.leave(cluster, str(instance_id)):
        raise HTTPException(404, f"instance {instance_id} is not registered")
    return CompatStatus(status="removed", instance_id=instance_id)
