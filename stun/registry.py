"""Soft state: clusters, their members, rank claims, generations and the events mailbox.

Everything here is rebuilt by the clients' own traffic: a member that stops heartbeating expires
after ``ttl_s``; a restarted server answers the next heartbeat with 404 and the member joins
again.  Methods that change state run on the event loop thread; the UDP relay thread only reads
(single dict lookups, atomic under the GIL) and hands its writes to the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Addr = tuple[str, int]
Clock = Callable[[], float]
MAX_EVENTS = 256  # per cluster: a mailbox for rendezvous chatter, not a message queue


class RegistryError(Exception):
    """A request the registry refuses; ``status`` is the HTTP answer."""

    status = 409


class Conflict(RegistryError):
    status = 409


class NotFound(RegistryError):
    status = 404


def relay_handle(cluster_id: str, instance_id: str) -> bytes:
    """8 bytes naming a member on the relay.  Derived, not random, so that a member keeps its
    handle across a server restart (peers need not re-learn it); knowing a handle grants
    nothing, since the relay forwards only from a member's authenticated relay address."""
    return hashlib.sha256(f"{cluster_id}\0{instance_id}".encode()).digest()[:8]


def new_generation() -> int:
    """Generations start from the wall clock in microseconds, so that they keep increasing
    across a restart and a client long-polling with a pre-restart generation is not stalled."""
    return time.time_ns() // 1000


@dataclass
class Member:
    cluster_id: str
    instance_id: str
    rank: int
    role: str | None
    token: bytes
    local: list[Addr]
    last_seen: float
    reflexive: Addr | None = None
    handle: bytes = b""
    removed: bool = False
    # relay rate limit, touched by the UDP thread only
    relay_tokens: float = 0.0
    relay_stamp: float = 0.0

    def __post_init__(self) -> None:
        if not self.handle:
            self.handle = relay_handle(self.cluster_id, self.instance_id)


@dataclass
class Event:
    seq: int
    from_instance: str
    kind: str
    body: Any
    at: float


@dataclass
class Cluster:
    cluster_id: str
    key_hash: bytes
    declared: bool
    world_size: int | None
    generation: int = field(default_factory=new_generation)
    members: dict[str, Member] = field(default_factory=dict)
    by_rank: dict[int, str] = field(default_factory=dict)
    by_handle: dict[bytes, Member] = field(default_factory=dict)
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    event_seq: int = field(default_factory=new_generation)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Store(Protocol):
    """Where the registry writes membership changes (``persist.SqliteStore``), if anywhere."""

    def save_cluster(self, cluster: Cluster) -> None: ...
    def delete_cluster(self, cluster_id: str) -> None: ...
    def save_member(self, member: Member) -> None: ...
    def delete_member(self, cluster_id: str, instance_id: str) -> None: ...


class Registry:
    def __init__(
        self,
        *,
        ttl_s: float,
        max_instances: int,
        default_world_size: int | None = None,
        clock: Clock = time.monotonic,
        store: Store | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_instances = max_instances
        self.default_world_size = default_world_size
        self.clock = clock
        self.store = store
        self.clusters: dict[str, Cluster] = {}
        # relay source address -> member: the relay thread's first lookup for every datagram
        self.relay_addrs: dict[Addr, Member] = {}

    # -- clusters ---------------------------------------------------------------------------

    def add_cluster(self, cluster_id: str, key_hash: bytes, *, declared: bool) -> Cluster:
        cluster = Cluster(cluster_id, key_hash, declared, self.default_world_size)
        self.clusters[cluster_id] = cluster
        if self.store is not None:
            self.store.save_cluster(cluster)
        return cluster

    def is_live(self, member: Member, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return not member.removed and now - member.last_seen <= self.ttl_s

    def live_member(self, cluster: Cluster, instance_id: str) -> Member | None:
        member = cluster.members.get(instance_id)
        if member is None:
            return None
        if not self.is_live(member):
            self._remove(cluster, member)
            return None
        return member

    # -- membership -------------------------------------------------------------------------

    def join(
        self,
        cluster: Cluster,
        instance_id: str,
        *,
        rank: int | None,
        world_size: int | None,
        local: list[Addr],
        role: str | None,
    ) -> Member:
        self.expire_cluster(cluster)
        if cluster.cluster_id not in self.clusters:
            # its last member just expired, which forgot a registration-created cluster
            self.clusters[cluster.cluster_id] = cluster
            if self.store is not None:
                self.store.save_cluster(cluster)
        if world_size is not None:
            if cluster.world_size is None:
                cluster.world_size = world_size
            elif cluster.world_size != world_size:
                raise Conflict(
                    f"world_size {world_size} does not match the cluster's {cluster.world_size}"
                )
        limit = min(cluster.world_size or self.max_instances, self.max_instances)
        previous = cluster.members.get(instance_id)
        if previous is None and len(cluster.members) >= self.max_instances:
            raise Conflict(
                f"the cluster has {self.max_instances} instances, the server's limit "
                "(COMFY_CLUSTER_STUN_MAX_INSTANCES)"
            )
        if rank is None:
            if previous is not None:
                rank = previous.rank
            else:
                rank = next((r for r in range(limit) if r not in cluster.by_rank), None)
                if rank is None:
                    raise Conflict(f"every rank of the cluster (0..{limit - 1}) is claimed")
        if rank >= limit:
            raise Conflict(f"rank {rank} is outside the cluster (0..{limit - 1})")
        holder = cluster.by_rank.get(rank)
        if holder is not None and holder != instance_id:
            raise Conflict(f"rank {rank} is claimed by another live instance")
        if previous is not None:
            self._remove(cluster, previous, persist=False)
        member = Member(
            cluster.cluster_id,
            instance_id,
            rank,
            role,
            secrets.token_bytes(16),
            local,
            self.clock(),
        )
        cluster.members[instance_id] = member
        cluster.by_rank[rank] = instance_id
        cluster.by_handle[member.handle] = member
        if self.store is not None:
            self.store.save_member(member)
        self.bump(cluster)
        return member

    def heartbeat(self, cluster: Cluster, instance_id: str, local: list[Addr] | None) -> int:
        member = self.live_member(cluster, instance_id)
        if member is None:
            raise NotFound("instance not registered or expired: join again")
        member.last_seen = self.clock()
        if local is not None and local != member.local:
            member.local = local
            self._changed(cluster, member)
        return cluster.generation

    def leave(self, cluster: Cluster, instance_id: str) -> bool:
        member = cluster.members.get(instance_id)
        if member is None:
            return False
        self._remove(cluster, member)
        return True

    def set_reflexive(self, member: Member, addr: Addr) -> bool:
        """Record an authenticated STUN binding's source; True when it changed."""
        cluster = self.clusters.get(member.cluster_id)
        if member.removed or cluster is None or member.reflexive == addr:
            return False
        if member.reflexive is not None and self.relay_addrs.get(member.reflexive) is member:
            del self.relay_addrs[member.reflexive]
        member.reflexive = addr
        self.relay_addrs[addr] = member
        self._changed(cluster, member)
        return True

    def restore(self, cluster: Cluster, member: Member) -> None:
        """Put back a member read from the store (it gets one TTL from now to heartbeat)."""
        member.last_seen = self.clock()
        cluster.members[member.instance_id] = member
        cluster.by_rank[member.rank] = member.instance_id
        cluster.by_handle[member.handle] = member
        if member.reflexive is not None:
            self.relay_addrs[member.reflexive] = member

    # -- expiry -----------------------------------------------------------------------------

    def expire_cluster(self, cluster: Cluster) -> int:
        now = self.clock()
        stale = [m for m in cluster.members.values() if not self.is_live(m, now)]
        for member in stale:
            self._remove(cluster, member)
        return len(stale)

    def expire(self) -> int:
        """Drop every expired member (and every empty cluster that registration created)."""
        return sum(self.expire_cluster(c) for c in list(self.clusters.values()))

    def _remove(self, cluster: Cluster, member: Member, *, persist: bool = True) -> None:
        member.removed = True
        if cluster.members.get(member.instance_id) is member:
            del cluster.members[member.instance_id]
        if cluster.by_rank.get(member.rank) == member.instance_id:
            del cluster.by_rank[member.rank]
        if cluster.by_handle.get(member.handle) is member:
            del cluster.by_handle[member.handle]
        if member.reflexive is not None and self.relay_addrs.get(member.reflexive) is member:
            del self.relay_addrs[member.reflexive]
        if persist and self.store is not None:
            self.store.delete_member(cluster.cluster_id, member.instance_id)
        if not cluster.members and persist:
            # an empty cluster starts afresh: the next job may have another size.  Not when the
            # only member is being replaced by its own re-join (persist=False): that is the
            # same job, and a size reset under it would strand ranks joining without one.
            cluster.world_size = self.default_world_size
            if not cluster.declared:
                # a cluster created by registration is forgotten with its last member, so
                # abandoned ids do not fill the server
                self.clusters.pop(cluster.cluster_id, None)
                if self.store is not None:
                    self.store.delete_cluster(cluster.cluster_id)
        self.bump(cluster)

    # -- generations and long polls ---------------------------------------------------------

    def _changed(self, cluster: Cluster, member: Member) -> None:
        if self.store is not None:
            self.store.save_member(member)
        self.bump(cluster)

    def bump(self, cluster: Cluster) -> None:
        cluster.generation += 1
        self._wake(cluster)

    def _wake(self, cluster: Cluster) -> None:
        waiters, cluster.waiters = cluster.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_change(self, cluster: Cluster, timeout_s: float) -> None:
        """Return at the cluster's next change, or after ``timeout_s``."""
        if timeout_s <= 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        cluster.waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            pass
        finally:
            if fut in cluster.waiters:
                cluster.waiters.remove(fut)

    # -- events mailbox ---------------------------------------------------------------------

    def post_event(self, cluster: Cluster, from_instance: str, kind: str, body: Any) -> int:
        if self.live_member(cluster, from_instance) is None:
            raise NotFound("from_instance is not a live member of the cluster")
        cluster.event_seq += 1
        cluster.events.append(Event(cluster.event_seq, from_instance, kind, body, self.clock()))
        self._wake(cluster)
        return cluster.event_seq

    def events_after(self, cluster: Cluster, after: int) -> list[Event]:
        return [e for e in cluster.events if e.seq > after]
