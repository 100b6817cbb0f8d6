"""Cluster settings of one ComfyUI instance, read from the environment once.

The cluster key (``COMFY_CLUSTER_KEY`` / ``COMFY_CLUSTER_KEY_FILE``) seals the control messages
the ranks send each other (comfy_nodes.server.seal).  Each instance receives them on one UDP port,
``COMFY_CLUSTER_CONTROL_PORT`` (default: the number of ComfyUI's own ``--port``, on UDP); a
follower reaches the leader's at ``COMFY_CLUSTER_LEADER_CONTROL`` (``HOST:PORT``; default: the
host and port of ``COMFY_CLUSTER_LEADER_URL``).  The key may be absent only when this instance is
reached on loopback (the advertised host, the leader's URL and ComfyUI's ``--listen`` addresses: see
:meth:`Settings.check_listen`) or with ``COMFY_CLUSTER_INSECURE=1``:
:func:`collectives.auth.require_key` refuses anything else, naming the variable.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from collectives.auth import ClusterKey, require_key
from collectives.deadline import check_timeout
from collectives.errors import ConfigurationError
from collectives.rendezvous.env import read_rank_env

JOIN_TIMEOUT_ENV = "COMFY_CLUSTER_JOIN_TIMEOUT"
IDLE_TIMEOUT_ENV = "COMFY_CLUSTER_IDLE_TIMEOUT"
LEADER_URL_ENV = "COMFY_CLUSTER_LEADER_URL"
ADVERTISE_ENV = "COMFY_CLUSTER_ADVERTISE_HOST"
HEARTBEAT_ENV = "COMFY_CLUSTER_HEARTBEAT_S"
HEARTBEAT_TIMEOUT_ENV = "COMFY_CLUSTER_HEARTBEAT_TIMEOUT_S"
CONTROL_PORT_ENV = "COMFY_CLUSTER_CONTROL_PORT"
LEADER_CONTROL_ENV = "COMFY_CLUSTER_LEADER_CONTROL"
REGISTRATION_MODE_ENV = "COMFY_CLUSTER_REGISTRATION_MODE"  # as the udp backend reads it
CONTROL_MAILBOX_ENV = "COMFY_CLUSTER_CONTROL_MAILBOX"


@dataclass(frozen=True)
class Settings:
    rank: int
    size: int
    backend: str | None  # None: collectives.init() decides (COMFY_CLUSTER_BACKEND, detection)
    op_timeout: float  # every collective (COMFY_CLUSTER_TIMEOUT)
    join_timeout: float  # how long a prompt waits for missing ranks to join
    idle_timeout: float  # how long a follower waits for the next prompt before re-arming
    leader_url: str | None  # the leader's ComfyUI, for membership messages (rejoin, abort)
    advertise_host: str  # how other ranks reach this instance's HTTP server
    key: ClusterKey | None = None  # signs and checks requests between ranks (repr: fingerprint)
    heartbeat_s: float = 2.0  # how often a follower reports to the leader (the cluster panel)
    heartbeat_timeout_s: float = 20.0  # silence after which the leader calls a follower lost
    control_port: int | None = None  # this instance's control port (None: ComfyUI's port)
    leader_control: tuple[str, int] | None = None  # the leader's control endpoint (followers)
    # Control messages UDP cannot deliver go through the rendezvous server's events mailbox
    # (comfy_nodes.server.carrier_mailbox): in stun discovery, unless CONTROL_MAILBOX_ENV is 0.
    stun_mailbox: bool = False

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings | None:
        """None when this ComfyUI is not part of a cluster (no rank variables, or one rank)."""
        env = os.environ if environ is None else environ
        rank_env = read_rank_env(env)
        if rank_env is None or rank_env.world_size < 2:
            return None

        def seconds(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            return check_timeout(raw, name) if raw else default

        leader_url = env.get(LEADER_URL_ENV, "").strip().rstrip("/") or None
        if leader_url is not None and not leader_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"{LEADER_URL_ENV}={leader_url!r} must be an http(s) URL of the leader's ComfyUI"
            )
        advertise_host = env.get(ADVERTISE_ENV, "").strip() or "127.0.0.1"
        key = require_key(
            advertise_host, f"the cluster's control routes ({ADVERTISE_ENV})", environ=env
        )
        if leader_url is not None:
            leader_host = urllib.parse.urlsplit(leader_url).hostname or ""
            _require_key(key, leader_host, f"messages to the leader ({LEADER_URL_ENV})", env)
        control_port = _port(env.get(CONTROL_PORT_ENV, ""), CONTROL_PORT_ENV)
        leader_control = _leader_control(env, leader_url)
        if leader_control is not None:
            what = f"the leader's control endpoint ({LEADER_CONTROL_ENV})"
            _require_key(key, leader_control[0], what, env)
        heartbeat = seconds(HEARTBEAT_ENV, 2.0)
        heartbeat_timeout = seconds(HEARTBEAT_TIMEOUT_ENV, 20.0)
        if heartbeat_timeout < 2 * heartbeat:
            # A shorter timeout would call a follower lost between two of its ordinary beats.
            raise ConfigurationError(
                f"{HEARTBEAT_TIMEOUT_ENV}={heartbeat_timeout:g} must be at least twice "
                f"{HEARTBEAT_ENV}={heartbeat:g}"
            )
        return cls(
            rank=rank_env.rank,
            size=rank_env.world_size,
            backend=env.get("COMFY_CLUSTER_BACKEND", "").strip() or None,
            op_timeout=seconds("COMFY_CLUSTER_TIMEOUT", 600.0),
            join_timeout=seconds(JOIN_TIMEOUT_ENV, 300.0),
            idle_timeout=seconds(IDLE_TIMEOUT_ENV, 86400.0),
            leader_url=leader_url,
            advertise_host=advertise_host,
            key=key,
            heartbeat_s=heartbeat,
            heartbeat_timeout_s=heartbeat_timeout,
            control_port=control_port,
            leader_control=leader_control,
            stun_mailbox=_stun_mailbox(env),
        )

    def check_listen(self, listen: str | None, environ: Mapping[str, str] | None = None) -> None:
        """Refuse to serve the control routes on ComfyUI's ``--listen`` address(es) (a
        comma-separated list) without a key, unless each is loopback (or the network is declared
        trusted): as :func:`collectives.auth.require_key`, with the key already read."""
        env = os.environ if environ is None else environ
        for host in (listen or "").split(","):
            if host.strip():
                _require_key(self.key, host.strip(), f"ComfyUI's server (--listen {host})", env)


def _require_key(key: ClusterKey | None, host: str, what: str, environ: Mapping[str, str]) -> None:
    """``require_key``'s refusal for one more address, for the key read once (a key read again
    could differ from the one in use)."""
    if key is None:
        require_key(host, what, environ)


def _port(raw: str, name: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigurationError(f"{name}={raw!r} must be a port number from 1 to 65535")
    return int(raw)


def _leader_control(env: Mapping[str, str], leader_url: str | None) -> tuple[str, int] | None:
    """The leader's control endpoint: ``COMFY_CLUSTER_LEADER_CONTROL``, else the leader URL's
    host and port (the leader's control port defaults to its ComfyUI port number)."""
    raw = env.get(LEADER_CONTROL_ENV, "").strip()
    if raw:
        host, sep, port = raw.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or _port(port, LEADER_CONTROL_ENV) is None:
            raise ConfigurationError(f"{LEADER_CONTROL_ENV}={raw!r} must be HOST:PORT")
        return host, int(port)
    if leader_url is None:
        return None
    parts = urllib.parse.urlsplit(leader_url)
    try:
        url_port = parts.port
    except ValueError:
        url_port = None
    if not parts.hostname:
        return None
    return parts.hostname, url_port or (443 if parts.scheme == "https" else 80)


def _stun_mailbox(env: Mapping[str, str]) -> bool:
    if env.get(REGISTRATION_MODE_ENV, "").strip().lower() != "stun":
        return False
    raw = env.get(CONTROL_MAILBOX_ENV, "").strip().lower()
    if raw not in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ConfigurationError(f"{CONTROL_MAILBOX_ENV}={raw!r} must be 0 or 1")
    return raw not in ("0", "false", "no", "off")
