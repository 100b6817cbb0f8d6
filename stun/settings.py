"""The server's settings, read from the environment (this project's names and the original's).

Each setting has one ``COMFY_CLUSTER_STUN_*`` name; where the original ComfyUI_Cluster server or
its README used another name for the same thing, that name is read too (ours wins when both are
set), so an existing deployment's environment keeps working.  Empty values count as unset.
Command line options (``python -m stun --host H --port P``) override both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from collectives.errors import ConfigurationError

#: cluster and instance ids: they appear in URLs and in the STUN USERNAME "{cluster}:{instance}"
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_ID_RE = re.compile(ID_PATTERN)
MIN_KEY_CHARS = 8  # the original server's floor for declared keys
MIN_OPEN_KEY_CHARS = 16  # a key that creates a cluster must resist guessing on its own


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told.  ``from_env`` builds one; tests build one directly."""

    host: str = "127.0.0.1"
    port: int = 8089
    udp_host: str | None = None  # None: the HTTP host; a socket listens only where it was told
    udp_port: int | None = 3478  # None: no UDP port (HTTP rendezvous only); 0: any free port
    udp_public_host: str | None = None  # what clients must address; default: the HTTP Host
    udp_public_port: int | None = None  # default: the bound UDP port
    udp_mode: str = "thread"  # "thread" (a dedicated relay thread) or "asyncio"
    log_level: str = "info"
    cluster_keys: Mapping[str, str] = field(default_factory=dict)
    open_registration: bool = False
    admin_key: str | None = None
    ttl_s: float = 60.0
    heartbeat_interval_s: float | None = None  # default: ttl_s / 3
    cleanup_interval_s: float = 5.0
    world_size: int | None = None
    max_body_bytes: int = 16 * 1024
    max_instances_per_cluster: int = 256
    max_clusters: int = 10_000
    rate_per_ip: float = 100.0  # requests/s per client address, burst twice that
    rate_per_cluster: float = 200.0  # authenticated requests/s per cluster
    longpoll_max_s: float = 30.0
    max_datagram_bytes: int = 2048
    relay_pps_per_instance: float = 400_000.0  # 3.8 Gbit/s of 1200 B (one core relays ~3M/s in GSO)
    stun_pps_per_ip: float = 50.0
    db_path: str | None = None

    def __post_init__(self) -> None:
        for cid, key in self.cluster_keys.items():
            if not _ID_RE.match(cid):
                raise ConfigurationError(
                    f"COMFY_CLUSTER_AUTH_KEYS: cluster id {cid!r} must match {ID_PATTERN}"
                )
            if len(key) < MIN_KEY_CHARS:
                raise ConfigurationError(
                    f"COMFY_CLUSTER_AUTH_KEYS: the key of cluster {cid!r} is shorter than "
                    f"{MIN_KEY_CHARS} characters"
                )
        if not self.cluster_keys and not self.open_registration:
            raise ConfigurationError(
                "no cluster can register: set COMFY_CLUSTER_AUTH_KEYS=cluster_id:key,... or "
                "COMFY_CLUSTER_STUN_OPEN_REGISTRATION=1"
            )
        if self.ttl_s <= 0:
            raise ConfigurationError("COMFY_CLUSTER_STUN_TTL_S must be positive")
        if self.udp_mode not in ("thread", "asyncio"):
            raise ConfigurationError("COMFY_CLUSTER_STUN_UDP_MODE must be 'thread' or 'asyncio'")
        if self.admin_key is not None and len(self.admin_key) < MIN_OPEN_KEY_CHARS:
            raise ConfigurationError(
                f"COMFY_CLUSTER_STUN_ADMIN_KEY must have at least {MIN_OPEN_KEY_CHARS} characters"
            )

    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat_interval_s if self.heartbeat_interval_s else self.ttl_s / 3

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = _Env(os.environ if env is None else env)
        udp = e.text("COMFY_CLUSTER_STUN_UDP_PORT")
        return cls(
            host=e.text("COMFY_CLUSTER_STUN_HOST", "STUN_SERVER_HOST") or cls.host,
            port=e.integer("COMFY_CLUSTER_STUN_PORT", "STUN_SERVER_PORT") or cls.port,
            udp_host=e.text("COMFY_CLUSTER_STUN_UDP_HOST"),
            udp_port=_udp_port(udp),
            udp_public_host=e.text("COMFY_CLUSTER_STUN_UDP_PUBLIC_HOST"),
            udp_public_port=e.integer("COMFY_CLUSTER_STUN_UDP_PUBLIC_PORT"),
            udp_mode=e.text("COMFY_CLUSTER_STUN_UDP_MODE") or cls.udp_mode,
            log_level=(e.text("COMFY_CLUSTER_STUN_LOG_LEVEL") or cls.log_level).lower(),
            cluster_keys=parse_auth_keys(e.text("COMFY_CLUSTER_AUTH_KEYS") or ""),
            open_registration=e.flag("COMFY_CLUSTER_STUN_OPEN_REGISTRATION"),
            admin_key=e.text("COMFY_CLUSTER_STUN_ADMIN_KEY"),
            ttl_s=e.number("COMFY_CLUSTER_STUN_TTL_S", "STUN_INSTANCE_TIMEOUT") or cls.ttl_s,
            heartbeat_interval_s=e.number("COMFY_CLUSTER_STUN_HEARTBEAT_S"),
            cleanup_interval_s=e.number(
                "COMFY_CLUSTER_STUN_CLEANUP_INTERVAL_S", "STUN_CLEANUP_INTERVAL"
            )
            or cls.cleanup_interval_s,
            world_size=e.integer("COMFY_CLUSTER_STUN_WORLD_SIZE"),
            max_body_bytes=e.integer("COMFY_CLUSTER_STUN_MAX_BODY_BYTES") or cls.max_body_bytes,
            max_instances_per_cluster=e.integer("COMFY_CLUSTER_STUN_MAX_INSTANCES")
            or cls.max_instances_per_cluster,
            max_clusters=e.integer("COMFY_CLUSTER_STUN_MAX_CLUSTERS") or cls.max_clusters,
            rate_per_ip=e.number("COMFY_CLUSTER_STUN_RATE_PER_IP") or cls.rate_per_ip,
            rate_per_cluster=e.number("COMFY_CLUSTER_STUN_RATE_PER_CLUSTER")
            or cls.rate_per_cluster,
            longpoll_max_s=e.number("COMFY_CLUSTER_STUN_LONGPOLL_MAX_S") or cls.longpoll_max_s,
            max_datagram_bytes=e.integer("COMFY_CLUSTER_STUN_MAX_DATAGRAM")
            or cls.max_datagram_bytes,
            relay_pps_per_instance=e.number("COMFY_CLUSTER_STUN_RELAY_PPS")
            or cls.relay_pps_per_instance,
            stun_pps_per_ip=e.number("COMFY_CLUSTER_STUN_STUN_PPS") or cls.stun_pps_per_ip,
            db_path=e.text("COMFY_CLUSTER_STUN_DB"),
        )


def parse_auth_keys(raw: str) -> dict[str, str]:
    """``id:key,id2:key2`` (the original's COMFY_CLUSTER_AUTH_KEYS) into a mapping."""
    keys: dict[str, str] = {}
    for pair in (p.strip() for p in raw.split(",")):
        if not pair:
            continue
        cid, sep, key = pair.partition(":")
        if not sep or not cid.strip() or not key.strip():
            raise ConfigurationError(
                "COMFY_CLUSTER_AUTH_KEYS must be cluster_id:key pairs separated by commas; "
                f"got an entry without both parts (cluster {cid.strip()!r})"
            )
        keys[cid.strip()] = key.strip()
    return keys


def _udp_port(raw: str | None) -> int | None:
    if raw is None:
        return Settings.udp_port
    if raw.lower() in ("off", "none", "-1"):
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ConfigurationError(
            f"COMFY_CLUSTER_STUN_UDP_PORT must be a port number or 'off', got {raw!r}"
        ) from None
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"COMFY_CLUSTER_STUN_UDP_PORT out of range: {port}")
    return port


class _Env:
    """Typed reads of the first set name among several (ours first, then the original's)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, *names: str) -> str | None:
        for name in names:
            value = self._env.get(name, "").strip()
            if value:
                return value
        return None

    def _named(self, names: tuple[str, ...]) -> tuple[str, str] | None:
        for name in names:
            value = self._env.get(name, "").strip()
            if value:
                return name, value
        return None

    def integer(self, *names: str) -> int | None:
        got = self._named(names)
        if got is None:
            return None
        try:
            return int(got[1])
        except ValueError:
            raise ConfigurationError(f"{got[0]} must be an integer, got {got[1]!r}") from None

    def number(self, *names: str) -> float | None:
        got = self._named(names)
        if got is None:
            return None
        try:
            return float(got[1])
        except ValueError:
            raise ConfigurationError(f"{got[0]} must be a number, got {got[1]!r}") from None

    def flag(self, name: str) -> bool:
        value = (self.text(name) or "0").lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ConfigurationError(f"{name} must be 1 or 0, got {value!r}")
