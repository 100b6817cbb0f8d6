"""The version 1 HTTP API (docs/rendezvous-protocol.md)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, Query, Request, Response

from .auth import UNAUTHORIZED_DETAIL, unauthorized
from .models import (
    Candidate,
    CandidateOut,
    ClustersResponse,
    ClusterSummary,
    EventIn,
    EventOut,
    EventPosted,
    EventsResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    JoinRequest,
    JoinResponse,
    MemberOut,
    MembersResponse,
    UdpEndpoint,
)
from .registry import Addr, Cluster, Member, RegistryError
from .settings import ID_PATTERN
from .state import AdminKey, ClusterKey, ServerState, State

ClusterId = Annotated[str, Path(pattern=ID_PATTERN)]
InstancePath = Annotated[str, Path(pattern=ID_PATTERN)]
MAX_EVENT_BODY = 4096

_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"description": UNAUTHORIZED_DETAIL},
    413: {"description": "request body too large"},
    429: {"description": "rate limited (see Retry-After)"},
}

router = APIRouter(prefix="/v1", responses=_ERRORS)


def _addrs(candidates: list[Candidate] | None) -> list[Addr] | None:
    return None if candidates is None else [(c.host, c.port) for c in candidates]


def _refused(exc: RegistryError) -> HTTPException:
    return HTTPException(exc.status, str(exc))


def member_out(state: ServerState, member: Member, now: float) -> MemberOut:
    cands = [CandidateOut(host=h, port=p, kind="local") for h, p in member.local]
    if member.reflexive is not None:
        host, port = member.reflexive
        cands.append(CandidateOut(host=host, port=port, kind="reflexive"))
    return MemberOut(
        instance_id=member.instance_id,
        rank=member.rank,
        handle=member.handle.hex(),
        role=member.role if member.role in ("leader", "follower") else None,  # type: ignore[arg-type]
        candidates=cands,
        age_s=round(max(0.0, now - member.last_seen), 3),
    )


def members_response(state: ServerState, cluster: Cluster) -> MembersResponse:
    registry = state.registry
    registry.expire_cluster(cluster)
    now = registry.clock()
    members = sorted(cluster.members.values(), key=lambda m: m.rank)
    return MembersResponse(
        world_size=cluster.world_size,
        generation=cluster.generation,
        members=[member_out(state, m, now) for m in members],
    )


def udp_endpoint(state: ServerState, request: Request) -> UdpEndpoint | None:
    udp = state.udp
    settings = state.settings
    port = settings.udp_public_port or (udp.port if udp is not None else None)
    if port is None:
        return None
    host = settings.udp_public_host or request.url.hostname or settings.host
    return UdpEndpoint(host=host, port=port)


@router.post("/clusters/{cluster_id}/join", response_model=JoinResponse)
async def join(
    cluster_id: ClusterId, body: JoinRequest, request: Request, state: State, key: ClusterKey
) -> JoinResponse:
    """Join a cluster (or join again after a 404 heartbeat); claims a rank."""
    cluster = state.authorize(cluster_id, key, may_create=True)
    try:
        member = state.registry.join(
            cluster,
            body.instance_id,
            rank=body.rank,
            world_size=body.world_size,
            local=_addrs(body.candidates) or [],
            role=body.role,
        )
    except RegistryError as exc:
        raise _refused(exc) from None
    return JoinResponse(
        instance_id=member.instance_id,
        rank=member.rank,
        world_size=cluster.world_size,
        token=base64.urlsafe_b64encode(member.token).decode(),
        handle=member.handle.hex(),
        udp=udp_endpoint(state, request),
        heartbeat_interval_s=state.settings.heartbeat_s,
        ttl_s=state.settings.ttl_s,
        generation=cluster.generation,
    )


@router.get("/clusters/{cluster_id}/members", response_model=MembersResponse)
async def members(
    cluster_id: ClusterId,
    state: State,
    key: ClusterKey,
    after_generation: Annotated[int | None, Query(ge=0)] = None,
    timeout_s: Annotated[float, Query(ge=0, le=30)] = 0.0,
) -> MembersResponse:
    """The live members; with ``after_generation``, waits until the generation exceeds it."""
    cluster = state.authorize(cluster_id, key)
    if after_generation is not None:
        wait = min(timeout_s, state.settings.longpoll_max_s)
        await _wait_until(state, cluster, wait, lambda: cluster.generation > after_generation)
    return members_response(state, cluster)


@router.post("/clusters/{cluster_id}/heartbeat/{instance_id}", response_model=HeartbeatResponse)
async def heartbeat(
    cluster_id: ClusterId,
    instance_id: InstancePath,
    state: State,
    key: ClusterKey,
    body: Annotated[HeartbeatRequest | None, Body()] = None,
) -> HeartbeatResponse:
    """Keep a member alive; 404 when it has expired (join again)."""
    cluster = state.authorize(cluster_id, key)
    local = _addrs(body.candidates) if body is not None else None
    try:
        generation = state.registry.heartbeat(cluster, instance_id, local)
    except RegistryError as exc:
        raise _refused(exc) from None
    return HeartbeatResponse(generation=generation)


@router.delete("/clusters/{cluster_id}/members/{instance_id}", status_code=204)
async def leave(
    cluster_id: ClusterId, instance_id: InstancePath, state: State, key: ClusterKey
) -> Response:
    """Leave the cluster (its rank is free at once)."""
    cluster = state.authorize(cluster_id, key)
    state.registry.leave(cluster, instance_id)
    return Response(status_code=204)


@router.post("/clusters/{cluster_id}/events", response_model=EventPosted)
async def post_event(
    cluster_id: ClusterId, body: EventIn, state: State, key: ClusterKey
) -> EventPosted:
    """Leave a small JSON message for the cluster's members (body at most 4 KiB)."""
    cluster = state.authorize(cluster_id, key)
    if len(json.dumps(body.body, separators=(",", ":"))) > MAX_EVENT_BODY:
        raise HTTPException(413, f"event body over {MAX_EVENT_BODY} bytes of JSON")
    try:
        seq = state.registry.post_event(cluster, body.from_instance, body.kind, body.body)
    except RegistryError as exc:
        raise _refused(exc) from None
    return EventPosted(seq=seq)


@router.get("/clusters/{cluster_id}/events", response_model=EventsResponse)
async def get_events(
    cluster_id: ClusterId,
    state: State,
    key: ClusterKey,
    after: Annotated[int, Query(ge=0)] = 0,
    timeout_s: Annotated[float, Query(ge=0, le=30)] = 0.0,
) -> EventsResponse:
    """Events with a sequence number above ``after``; waits up to ``timeout_s`` for one."""
    cluster = state.authorize(cluster_id, key)
    registry = state.registry
    wait = min(timeout_s, state.settings.longpoll_max_s)
    await _wait_until(state, cluster, wait, lambda: bool(registry.events_after(cluster, after)))
    now = registry.clock()
    return EventsResponse(
        events=[
            EventOut(
                seq=e.seq,
                from_instance=e.from_instance,
                kind=e.kind,
                body=e.body,
                age_s=round(now - e.at, 3),
            )
            for e in registry.events_after(cluster, after)
        ]
    )


@router.get("/clusters", response_model=ClustersResponse)
async def list_clusters(state: State, admin: AdminKey) -> ClustersResponse:
    """Every cluster (operators only: needs ``X-Admin-Key``)."""
    if not state.hasher.admin_ok(state.settings.admin_key, admin):
        raise unauthorized()
    state.registry.expire()
    return ClustersResponse(
        clusters=[
            ClusterSummary(cluster_id=c.cluster_id, members=len(c.members), declared=c.declared)
            for c in sorted(state.registry.clusters.values(), key=lambda c: c.cluster_id)
        ]
    )


@router.get("/stats")
async def stats(state: State, admin: AdminKey) -> dict[str, object]:
    """Counters of the UDP port and the registry (operators only: needs ``X-Admin-Key``)."""
    if not state.hasher.admin_ok(state.settings.admin_key, admin):
        raise unauthorized()
    registry = state.registry
    return {
        "clusters": len(registry.clusters),
        "members": sum(len(c.members) for c in registry.clusters.values()),
        "udp": state.udp.core.counters.snapshot() if state.udp is not None else None,
    }


async def _wait_until(
    state: ServerState, cluster: Cluster, timeout_s: float, done: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await state.registry.wait_change(cluster, left)
