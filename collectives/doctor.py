"""``comfycluster doctor``'s checks, as a library (the ClusterInfo node prints them too).

:func:`run_checks` looks at one machine's view of a cluster and returns one :class:`Check` per
question: is the discovery configured, does the rendezvous server answer (TLS verified), does it
accept the key, can this machine bind its UDP port and reach the server's UDP port (its NAT's
reflexive address), what path MTU and socket buffers does it get, and which peers are
registered with which candidates.  Every failed check carries the fix, naming the variable,
option or sysctl to change.

What it can and cannot see: from outside a rank it cannot tell a peer's path (direct, punched,
relayed), since probing a peer needs the world's identity, which only its ranks hold; given a
running rank's communicator (``comm=``) it reports the path and state of every peer as that
rank sees them.  The reflexive address comes from a plain STUN binding (no credential: an
authenticated one needs a rank's join); the server answers both alike.  The MTU is the kernel's
route MTU towards the server, an upper bound of the real path MTU.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from collectives import _compiled
from collectives.auth import KEY_ENV, ClusterKey
from collectives.backends import cma, udp_peers
from collectives.backends.udp_socket import (
    BUFFER_REQUEST,
    BUFFER_WANTED,
    DEFAULT_DATAGRAM,
    MTU_ENV,
    max_datagram_for,
)
from collectives.errors import CollectivesError, ConfigurationError, RendezvousError
from collectives.rendezvous.stun_client import (
    CA_FILE_ENV,
    CLUSTER_ID_ENV,
    SERVER_ENV,
    Members,
    StunAuthError,
    StunClient,
)

_IP_MTU = 14  # getsockopt(IPPROTO_IP, IP_MTU) on a connected socket: the route's MTU (Linux)
_UDP_IP_OVERHEAD = 28  # IPv4 (20) + UDP (8)
_RELAY_HEADER = 10  # 0xCC, kind, handle(8): what the relay adds to a datagram
_STUN_TRIES = 3
_STUN_WAIT_S = 0.5
_SO_RCVBUFFORCE = 33
_SO_SNDBUFFORCE = 32


@dataclass(frozen=True)
class Check:
    """One answer: ``ok``, what was found (``detail``) and, when not ok, the ``fix``."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.name}: {self.detail}"
        return f"PROBLEM  {self.name}: {self.detail} -> fix: {self.fix}"


def report(checks: list[Check]) -> str:
    """One line per check, then a summary line."""
    problems = sum(not c.ok for c in checks)
    tail = "no problem found" if not problems else f"{problems} problem(s) found"
    return "\n".join([*(c.line() for c in checks), tail])


def run_checks(
    environ: Mapping[str, str] | None = None,
    *,
    comm: Any = None,
    timeout: float = 5.0,
    buffer_wanted: int = BUFFER_WANTED,
) -> list[Check]:
    """Every check for ``environ`` (default: this process's); ``comm``: a running rank's
    communicator, whose peers' states and paths are reported too.  ``buffer_wanted``: the
    socket buffer below which a rank drops bursts (the udp backend's threshold)."""
    env = dict(os.environ if environ is None else environ)
    mode = (env.get(udp_peers.MODE_ENV) or "env").strip().lower()
    checks: list[Check] = []
    plan = _discovery(env, mode, checks)
    server: str | None = None
    health: dict[str, Any] | None = None
    members: Members | None = None
    if mode == "stun" and plan is not None:
        server = plan.stun_server
        health = _server(env, server, timeout, checks)
        if health is not None:
            members = _key(env, server, timeout, checks)
    sock = _udp_port(env, plan, checks)
    if sock is not None:
        try:
            target: tuple[str, int] | None = None
            if server is not None and health is not None:
                target = _server_udp(server, health)
                if target is not None:
                    _nat(sock, target, timeout, checks)
                else:
                    checks.append(_no_udp(server, health))
            _mtu(env, sock, target, mode, checks)
            _buffers(sock, buffer_wanted, checks)
        finally:
            sock.close()
    if members is not None:
        _peers(members, env, checks)
    if comm is not None:
        _comm(comm, checks)
    checks.append(_core())
    checks.append(Check("same-host copies", True, cma.host_policy()[1]))  # speed, not a problem
    return checks


def _core() -> Check:
    """Whether the udp transport's core runs compiled (collectives/_compiled.py): a speed
    question, never a problem (the source works the same)."""
    status = _compiled.status()
    if status["mode"] == "compiled":
        return Check("udp core", True, "compiled (mypyc)")
    return Check("udp core", True, f"pure Python ({status['why']}); {status['hint']}")


# -- configuration ------------------------------------------------------------------------------
def _discovery(env: dict[str, str], mode: str, checks: list[Check]) -> udp_peers.Plan | None:
    name = "discovery"
    if mode not in udp_peers.MODES:
        checks.append(
            Check(
                name,
                False,
                f"{udp_peers.MODE_ENV}={mode!r} is unknown",
                f"set {udp_peers.MODE_ENV} to one of {', '.join(udp_peers.MODES)}",
            )
        )
        return None
    try:
        key = ClusterKey.from_env(env)
    except ConfigurationError as err:
        checks.append(Check("key", False, "the cluster key cannot be read", str(err)))
        return None
    try:
        if mode == "stun":
            plan = udp_peers.plan(0, 2, env)
        elif mode == "static":
            entries = [e for e in env.get(udp_peers.HOSTNAMES_ENV, "").split(",") if e.strip()]
            plan = udp_peers.plan(0, max(len(entries), 1), env)
        elif mode == "broadcast" or env.get("MASTER_ADDR", "").strip():
            plan = udp_peers.plan(0, 2, env)
        else:
            plan = udp_peers.plan(0, 1, env)  # loopback: MASTER_ADDR comes from the launcher
    except ConfigurationError as err:
        checks.append(Check(name, False, f"{udp_peers.MODE_ENV}={mode} is not usable", str(err)))
        return None
    if mode == "stun" and key is None:
        checks.append(
            Check(
                name,
                False,
                f"{udp_peers.MODE_ENV}=stun without a cluster key",
                f"set {KEY_ENV} (the invite's key: comfycluster-launch --join sets it)",
            )
        )
        return None
    where = {
        "stun": f"rendezvous server {plan.stun_server}, cluster {env.get(CLUSTER_ID_ENV, '')!r}",
        "static": f"{udp_peers.HOSTNAMES_ENV} lists {len(plan.static)} rank(s)",
        "broadcast": f"broadcasts to {plan.broadcast}",
        "env": f"rank 0's store at {plan.master}"
        if plan.master
        else "no MASTER_ADDR here (a launcher sets it for its ranks)",
    }[mode]
    checks.append(Check(name, True, f"{udp_peers.MODE_ENV}={mode}: {where}"))
    return plan


# -- the rendezvous server ----------------------------------------------------------------------
def _server(
    env: dict[str, str], base: str | None, timeout: float, checks: list[Check]
) -> dict[str, Any] | None:
    """GET /health (the one route outside the client's cluster API)."""
    import httpx

    assert base is not None
    ca = env.get(CA_FILE_ENV, "").strip()
    tls = base.startswith("https://")
    try:
        with httpx.Client(verify=ca or True, timeout=timeout, trust_env=False) as http:
            answer = http.get(base + "/health")
    except httpx.ConnectError as err:
        text = str(err)
        if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
            checks.append(
                Check(
                    "server",
                    False,
                    f"{base}: TLS verification failed ({text})",
                    f"give the server a certificate for its name, or set "
                    f"{CA_FILE_ENV} to the CA that signed it",
                )
            )
        else:
            checks.append(
                Check(
                    "server",
                    False,
                    f"cannot reach {base} ({text})",
                    f"start the server (comfycluster-stun), or correct {SERVER_ENV}; "
                    "a firewall must let TCP to its port through",
                )
            )
        return None
    except httpx.HTTPError as err:
        checks.append(
            Check(
                "server",
                False,
                f"{base} did not answer within {timeout:g} s ({type(err).__name__})",
                f"check {SERVER_ENV} and the network path to it",
            )
        )
        return None
    try:
        body = answer.json() if answer.status_code == 200 else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("status") != "ok":
        checks.append(
            Check(
                "server",
                False,
                f"{base}/health answered {answer.status_code}, not a rendezvous server's health",
                f"point {SERVER_ENV} at the comfycluster-stun server (its HTTP port)",
            )
        )
        return None
    security = "TLS verified" if tls else "plain http: fine on loopback or a trusted network"
    checks.append(
        Check(
            "server",
            True,
            f"{base} answers ({security}), version "
            f"{body.get('version', '?')}, UDP port {body.get('udp_port')}",
        )
    )
    return body


def _key(
    env: dict[str, str], base: str | None, timeout: float, checks: list[Check]
) -> Members | None:
    assert base is not None
    cluster = env.get(CLUSTER_ID_ENV, "").strip()
    try:
        key = ClusterKey.from_env(env)
        client = StunClient.from_env(env, key)
    except ConfigurationError as err:
        checks.append(Check("key", False, "cannot ask the server", str(err)))
        return None
    client.timeout = timeout
    try:
        members = client.members()
    except StunAuthError:
        checks.append(
            Check(
                "key",
                False,
                f"the server refused cluster {cluster!r} with this key",
                f"set {KEY_ENV} and {CLUSTER_ID_ENV} to the values the server has in "
                "COMFY_CLUSTER_AUTH_KEYS (or ask the leader for a new invite: "
                "comfycluster invite)",
            )
        )
        return None
    except RendezvousError as err:
        checks.append(
            Check("key", False, f"the members request failed: {err}", f"check {SERVER_ENV}")
        )
        return None
    finally:
        client.close()
    size = "not fixed yet" if members.world_size is None else str(members.world_size)
    checks.append(
        Check(
            "key",
            True,
            f"accepted for cluster {cluster!r}: "
            f"{len(members.members)} member(s), world size {size}",
        )
    )
    return members


def _server_udp(base: str, health: dict[str, Any] | None) -> tuple[str, int] | None:
    port = None if health is None else health.get("udp_port")
    host = urlsplit(base).hostname
    if not isinstance(port, int) or not host:
        return None
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return None
    return str(infos[0][4][0]), port


def _no_udp(base: str, health: dict[str, Any]) -> Check:
    if health.get("udp_port") is None:
        return Check(
            "nat",
            False,
            f"{base} runs without its UDP port (STUN and relay), which the udp backend needs",
            "start the server with --udp-port (default 3478)",
        )
    return Check(
        "nat",
        False,
        f"the server's host in {base} does not resolve to IPv4",
        f"set {SERVER_ENV} to a name with an IPv4 address",
    )


# -- this machine -------------------------------------------------------------------------------
def _udp_port(
    env: dict[str, str], plan: udp_peers.Plan | None, checks: list[Check]
) -> socket.socket | None:
    host, port = plan.bind if plan is not None else ("0.0.0.0", 0)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        checks.append(
            Check(
                "udp port",
                False,
                f"cannot bind {host}:{port} ({err.strerror or err})",
                f"set {udp_peers.LISTEN_ENV} to an "
                f"address of this host and {udp_peers.PORT_ENV} to a free port (0: "
                "any)",
            )
        )
        return None
    bound = sock.getsockname()
    advert = ""
    if plan is not None and plan.advertise:
        advert = f", advertised as {plan.advertise}"
        if plan.advertise.endswith(".runpod.internal"):
            advert += f" ({udp_peers.RUNPOD_ENV})"
    checks.append(Check("udp port", True, f"bound {bound[0]}:{bound[1]}{advert}"))
    return sock


def _nat(sock: socket.socket, server: tuple[str, int], timeout: float, checks: list[Check]) -> None:
    """Two plain STUN bindings from the rank's socket: the reflexive address and a NAT hint."""
    got = [_binding(sock, server, timeout) for _ in range(2)]
    first = got[0]
    if first is None:
        checks.append(
            Check(
                "nat",
                False,
                f"no STUN answer from the server's UDP port {server[0]}:{server[1]}",
                "let UDP to that port through the "
                "firewall (both ways); on the server, check "
                "COMFY_CLUSTER_STUN_UDP_PUBLIC_HOST/PORT",
            )
        )
        return
    local = sock.getsockname()
    if got[1] is not None and got[1] != first:
        checks.append(
            Check(
                "nat",
                True,
                f"reflexive {first[0]}:{first[1]}, then "
                f"{got[1][0]}:{got[1][1]}: the NAT moved the mapping between two "
                "requests (it rebinds): peers will often fall back to the relay",
            )
        )
        return
    if first == (str(local[0]), int(local[1])):
        hint = "no NAT towards the server"
    else:
        # One server address cannot tell a cone NAT from a symmetric one: the ranks try
        # punching and keep the relay when it fails.
        hint = f"behind a NAT (public address {first[0]}); peers start on the relay and punch"
    checks.append(
        Check(
            "nat", True, f"reflexive {first[0]}:{first[1]} for local {local[0]}:{local[1]}: {hint}"
        )
    )


def _binding(
    sock: socket.socket, server: tuple[str, int], timeout: float
) -> tuple[str, int] | None:
    from aioice import stun

    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    wait = min(_STUN_WAIT_S, timeout)
    for _ in range(_STUN_TRIES):
        try:
            sock.sendto(bytes(request), server)
        except OSError:
            return None
        until = time.monotonic() + wait
        while (left := until - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, src = sock.recvfrom(2048)
            except (TimeoutError, OSError):
                break
            if (str(src[0]), int(src[1])) != server or len(data) > 548:
                continue
            with contextlib.suppress(ValueError, KeyError, IndexError, UnicodeDecodeError):
                answer = stun.parse_message(data)
                mapped = answer.attributes.get("XOR-MAPPED-ADDRESS")
                if answer.transaction_id == request.transaction_id and isinstance(mapped, tuple):
                    return str(mapped[0]), int(mapped[1])
    return None


def _mtu(
    env: dict[str, str],
    sock: socket.socket,
    target: tuple[str, int] | None,
    mode: str,
    checks: list[Check],
) -> None:
    host = str(sock.getsockname()[0])
    try:
        datagram = max_datagram_for(host, env)
    except ConfigurationError as err:
        checks.append(Check("mtu", False, f"{MTU_ENV} is not usable", str(err)))
        return
    if mode == "stun" and not env.get(MTU_ENV, "").strip():
        datagram = min(datagram, DEFAULT_DATAGRAM)  # what the backend uses over the Internet
    if target is None or not sys.platform.startswith("linux"):
        checks.append(Check("mtu", True, f"{datagram} B datagrams (no route to measure here)"))
        return
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            route_mtu = int(probe.getsockopt(socket.IPPROTO_IP, _IP_MTU))
    except OSError as err:
        checks.append(Check("mtu", True, f"{datagram} B datagrams (route MTU unknown: {err})"))
        return
    needed = datagram + _UDP_IP_OVERHEAD + (_RELAY_HEADER if mode == "stun" else 0)
    if needed > route_mtu:
        fit = route_mtu - _UDP_IP_OVERHEAD - _RELAY_HEADER
        checks.append(
            Check(
                "mtu",
                False,
                f"{datagram} B datagrams need {needed} B packets, the "
                f"route towards {target[0]} carries {route_mtu} B",
                f"set {MTU_ENV}={fit}",
            )
        )
        return
    checks.append(
        Check(
            "mtu",
            True,
            f"{datagram} B datagrams ({needed} B packets relayed) fit the "
            f"route MTU {route_mtu} B towards {target[0]} (an upper bound of the path "
            "MTU)",
        )
    )


def _buffers(sock: socket.socket, wanted: int, checks: list[Check]) -> None:
    """What a rank's socket gets: the udp backend asks for BUFFER_REQUEST, then forces it."""
    granted = {}
    for name, option, force, sysctl in (
        ("receive", socket.SO_RCVBUF, _SO_RCVBUFFORCE, "net.core.rmem_max"),
        ("send", socket.SO_SNDBUF, _SO_SNDBUFFORCE, "net.core.wmem_max"),
    ):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_REQUEST)
        size = int(sock.getsockopt(socket.SOL_SOCKET, option))
        if size < BUFFER_REQUEST and sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN
                sock.setsockopt(socket.SOL_SOCKET, force, BUFFER_REQUEST)
                size = int(sock.getsockopt(socket.SOL_SOCKET, option))
        granted[name] = (size, sysctl)
    low = {n: v for n, v in granted.items() if v[0] < wanted}
    text = ", ".join(f"{n} {_mib(v[0])}" for n, v in granted.items())
    text += f" (asked {_mib(BUFFER_REQUEST)}; Linux reports double, for its bookkeeping)"
    if low:
        fix = "; ".join(f"sysctl -w {v[1]}={BUFFER_REQUEST}" for v in low.values())
        checks.append(
            Check(
                "socket buffers",
                False,
                f"{text}: below {_mib(wanted)}, bursts will be dropped and resent",
                f"{fix} (or run the ranks with CAP_NET_ADMIN)",
            )
        )
        return
    checks.append(Check("socket buffers", True, text))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# -- peers --------------------------------------------------------------------------------------
def _peers(members: Members, env: dict[str, str], checks: list[Check]) -> None:
    table = members.by_rank()
    size = members.world_size
    for rank in sorted(table):
        m = table[rank]
        cands = ", ".join(f"{c.host}:{c.port} ({c.kind})" for c in m.candidates) or "none"
        name = f"peer rank {rank}"
        if not m.candidates:
            checks.append(
                Check(
                    name,
                    True,
                    f"{m.instance_id}: claimed by a launcher, the rank has not started yet",
                )
            )
        elif not any(c.kind == "reflexive" for c in m.candidates):
            checks.append(
                Check(
                    name,
                    False,
                    f"{m.instance_id}: candidates {cands}, but no STUN "
                    "binding reached the server from it",
                    "on that machine, let UDP "
                    "to the server's UDP port through (run comfycluster doctor there)",
                )
            )
        else:
            checks.append(
                Check(name, True, f"{m.instance_id}: candidates {cands}, seen {m.age_s:.0f} s ago")
            )
    if size is not None:
        missing = [r for r in range(size) if r not in table]
        if missing:
            checks.append(
                Check(
                    "peers",
                    True,
                    f"rank(s) {', '.join(map(str, missing))} of {size} "
                    "not registered (yet): the world forms when every rank has "
                    "joined",
                )
            )


def _comm(comm: Any, checks: list[Check]) -> None:
    """A running rank's own view: each peer's state and path."""
    try:
        states = dict(comm.peers())
        stats = comm.stats()
    except CollectivesError as err:
        checks.append(
            Check("paths", False, f"the communicator cannot report ({err})", "check the rank's log")
        )
        return
    paths = stats.get("paths", {}) if isinstance(stats, dict) else {}
    same_host = set(stats.get("same_host", ())) if isinstance(stats, dict) else set()
    for peer in sorted(states):
        info = paths.get(peer, {})
        path = info.get("path", "direct") if isinstance(info, dict) else "direct"
        where = info.get("address") if isinstance(info, dict) else None
        state = states[peer]
        detail = f"{state}, path {path}" + (f" via {where[0]}:{where[1]}" if where else "")
        detail += ", large bodies copied from its memory" if peer in same_host else ""
        if state == "lost":
            checks.append(
                Check(
                    f"path to rank {peer}",
                    False,
                    detail,
                    "restart that rank or check its network (comfycluster doctor on its machine)",
                )
            )
        else:
            checks.append(Check(f"path to rank {peer}", True, detail))


__all__ = ["Check", "report", "run_checks"]
