"""Request and answer bodies of the HTTP API (docs/rendezvous-protocol.md), as pydantic models.

Every string and list has a bound, so a request is refused before it costs memory.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .settings import ID_PATTERN

InstanceId = Annotated[str, Field(pattern=ID_PATTERN, examples=["rank-0"])]
Role = Literal["leader", "follower"]
MAX_CANDIDATES = 8
# an IP literal or a DNS name: letters, digits, dots, dashes, colons (IPv6)
HOST_PATTERN = r"^[A-Za-z0-9.:%_-]{1,253}$"


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field(pattern=HOST_PATTERN, examples=["192.168.1.20"])
    port: int = Field(ge=1, le=65535)


class CandidateOut(Candidate):
    kind: Literal["local", "reflexive"]


class UdpEndpoint(BaseModel):
    host: str
    port: int


class JoinRequest(BaseModel):
    instance_id: InstanceId
    rank: int | None = Field(default=None, ge=0, le=65535)
    world_size: int | None = Field(default=None, ge=1, le=65536)
    candidates: list[Candidate] = Field(default_factory=list, max_length=MAX_CANDIDATES)
    role: Role | None = None


class JoinResponse(BaseModel):
    instance_id: str
    rank: int
    world_size: int | None
    token: str = Field(description="base64url (padded) of 16 random bytes: the STUN credential")
    handle: str = Field(description="16 hex characters: this instance's relay handle")
    udp: UdpEndpoint | None = Field(description="the STUN/relay port; null when disabled")
    heartbeat_interval_s: float
    ttl_s: float
    generation: int


class MemberOut(BaseModel):
    instance_id: str
    rank: int
    handle: str
    role: Role | None
    candidates: list[CandidateOut]
    age_s: float


class MembersResponse(BaseModel):
    world_size: int | None
    generation: int
    members: list[MemberOut]


class HeartbeatRequest(BaseModel):
    candidates: list[Candidate] | None = Field(default=None, max_length=MAX_CANDIDATES)


class HeartbeatResponse(BaseModel):
    generation: int


class EventIn(BaseModel):
    from_instance: InstanceId
    kind: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    body: Any = None


class EventOut(BaseModel):
    seq: int
    from_instance: str
    kind: str
    body: Any
    age_s: float


class EventPosted(BaseModel):
    seq: int


class EventsResponse(BaseModel):
    events: list[EventOut]


class ClusterSummary(BaseModel):
    cluster_id: str
    members: int
    declared: bool


class ClustersResponse(BaseModel):
    clusters: list[ClusterSummary]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str
    uptime_s: float
    udp_port: int | None


# -- the original project's routes ----------------------------------------------------------


class CompatRegistration(BaseModel):
    """The original client's body: its key travels here, not in a header."""

    address: str = Field(pattern=HOST_PATTERN)
    direct_listen_port: int = Field(ge=1, le=65535)
    role: str = Field(max_length=16)
    instance_id: int = Field(ge=0, le=65535)
    cluster_id: str = Field(pattern=ID_PATTERN)
    cluster_key: str | None = Field(default=None, max_length=1024)

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        # the original client sends lower case; its README shows upper case
        lowered = value.lower()
        if lowered not in ("leader", "follower"):
            raise ValueError("role must be leader or follower")
        return lowered


class CompatInstance(BaseModel):
    instance_id: int
    address: str
    direct_listen_port: int
    role: str
    last_seen: float
    last_ping: str


class CompatRegistered(BaseModel):
    status: Literal["registered"]
    instance_count: int
    instance_id: int
    instances: list[CompatInstance]


class CompatInstances(BaseModel):
    cluster_id: str
    instances: list[CompatInstance]
    last_change_time: float


class CompatStatus(BaseModel):
    status: str
    instance_id: int | None = None
