"""The HTTP client of the rendezvous server's v1 API (docs/rendezvous-protocol.md).

One :class:`StunClient` per instance: ``join`` registers it (its udp socket's local candidates)
and returns its STUN credential and relay handle, ``members`` long-polls the cluster's
membership, ``heartbeat`` keeps the record alive (a ``404`` means it expired: join again),
``leave`` removes it, ``post_event``/``events`` carry small JSON notes between instances.
:class:`Heartbeat` is the thread that heartbeats and rejoins.

Security: the cluster key travels in the ``X-Cluster-Key`` header, so TLS is verified by default
against the system's CAs; ``COMFY_CLUSTER_STUN_CA_FILE`` names a PEM bundle to verify a private
server against instead (a file that is missing or holds no certificate is a ConfigurationError,
a certificate that does not verify a :class:`TlsVerifyError`, both naming the variable).  Plain
``http://`` is refused unless the server is on loopback (the key never leaves the machine) or
``COMFY_CLUSTER_STUN_ALLOW_HTTP=1`` says the network is trusted.  Every request has a timeout;
every failure is a typed error that names the variable to fix.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from collectives.auth import KEY_ENV, ClusterKey, is_loopback
from collectives.errors import (
    ConfigurationError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousTimeoutError,
)

log = logging.getLogger(__name__)

SERVER_ENV = "COMFY_CLUSTER_STUN_SERVER"
CLUSTER_ID_ENV = "COMFY_CLUSTER_CLUSTER_ID"
CA_FILE_ENV = "COMFY_CLUSTER_STUN_CA_FILE"
ALLOW_HTTP_ENV = "COMFY_CLUSTER_STUN_ALLOW_HTTP"
INSTANCE_ID_ENV = "COMFY_CLUSTER_INSTANCE_ID"
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HANDLE = re.compile(r"[0-9a-f]{16}")
MAX_CANDIDATES = 8
MAX_POLL_S = 30.0
_MAX_BODY = 1 << 20  # no answer of this API comes near it; a bigger one is refused unread

Address = tuple[str, int]


class StunServerError(RendezvousError):
    """The rendezvous server refused a request or answered something this client cannot use."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StunAuthError(StunServerError):
    """``401``: unknown cluster or wrong key (the server does not say which)."""


class StunConflictError(StunServerError):
    """``409``: the rank is taken, the world size differs, or the cluster is full."""


class TlsVerifyError(RendezvousConnectionError):
    """The server's TLS certificate did not verify (a private CA not given, or the wrong one)."""


class InstanceExpiredError(StunServerError):
    """``404`` on a heartbeat: the instance's record expired; join again."""


@dataclass(frozen=True)
class Candidate:
    host: str
    port: int
    kind: str = "local"  # "local" (the socket's own address) or "reflexive" (seen by the server)

    def address(self) -> Address:
        return (self.host, self.port)


@dataclass(frozen=True)
class Joined:
    instance_id: str
    rank: int
    world_size: int | None
    token: bytes  # the 16-byte STUN credential (MESSAGE-INTEGRITY key)
    handle: bytes  # the 8-byte relay handle
    udp: Address | None  # the server's STUN/relay port (None: the server runs without one)
    heartbeat_interval_s: float
    ttl_s: float
    generation: int


@dataclass(frozen=True)
class Member:
    instance_id: str
    rank: int
    handle: bytes
    role: str | None
    candidates: tuple[Candidate, ...]
    age_s: float


@dataclass(frozen=True)
class Members:
    world_size: int | None
    generation: int
    members: tuple[Member, ...]

    def by_rank(self) -> dict[int, Member]:
        return {m.rank: m for m in self.members}


@dataclass(frozen=True)
class ClusterEvent:
    seq: int
    from_instance: str
    kind: str
    body: Any
    age_s: float


def check_instance_id(value: str, what: str = INSTANCE_ID_ENV) -> str:
    if not _ID.fullmatch(value):
        raise ConfigurationError(f"{what}={value!r} must be 1-64 characters of [A-Za-z0-9_.-]")
    return value


def server_url(raw: str, environ: Mapping[str, str]) -> str:
    """``COMFY_CLUSTER_STUN_SERVER`` as a base URL (``https://`` when no scheme is given)."""
    text = raw.strip().rstrip("/")
    if not text:
        raise ConfigurationError(
            f"{SERVER_ENV} is not set: set it to the rendezvous server's URL, e.g. "
            "https://stun.example.org:8089"
        )
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{SERVER_ENV}={raw!r} is not an http(s) URL")
    allow = environ.get(ALLOW_HTTP_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow:
        raise ConfigurationError(
            f"{SERVER_ENV}={raw!r} is plain http: the cluster key would cross the network in "
            f"clear; use https (with {CA_FILE_ENV} for a private CA), or set {ALLOW_HTTP_ENV}=1 "
            "on a network you trust"
        )
    return text


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The TLS verification of the client: the system's CAs, or only ``ca_file``'s (PEM)."""
    if not ca_file:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigurationError(f"{CA_FILE_ENV}={ca_file!r}: no such file") from None
    except (OSError, ssl.SSLError) as err:
        raise ConfigurationError(
            f"{CA_FILE_ENV}={ca_file!r} is not a PEM CA bundle ({err})"
        ) from None


class StunClient:
    """The v1 API of one cluster on one server (see the module docstring)."""

    def __init__(
        self,
        server: str,
        cluster_id: str,
        key: ClusterKey,
        *,
        timeout: float = 10.0,
        verify: bool | str = True,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """``verify``: True (the system's CAs), a CA bundle's path, or False (tests only)."""
        import httpx

        self.base = server_url(server, environ or {})
        self.cluster_id = check_instance_id(cluster_id, CLUSTER_ID_ENV)
        self.timeout = timeout
        self.ca_file = verify if isinstance(verify, str) else None
        context: ssl.SSLContext | bool = False
        if verify is not False and self.base.startswith("https://"):
            context = tls_context(self.ca_file)
        self._http = httpx.Client(
            base_url=self.base,
            headers={"X-Cluster-Key": key.text},
            timeout=httpx.Timeout(timeout),
            verify=context,
            follow_redirects=False,
            trust_env=False,  # a proxy variable must not see the cluster key
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], key: ClusterKey | None) -> StunClient:
        if key is None:
            raise ConfigurationError(
                f"the rendezvous server ({SERVER_ENV}) authenticates with the cluster key: set "
                f"{KEY_ENV} (the same secret on every instance and the server)"
            )
        cluster = environ.get(CLUSTER_ID_ENV, "").strip()
        if not cluster:
            raise ConfigurationError(
                f"{CLUSTER_ID_ENV} is not set: every instance of one cluster uses the same id "
                "on the rendezvous server"
            )
        ca = environ.get(CA_FILE_ENV, "").strip()
        return cls(environ.get(SERVER_ENV, ""), cluster, key, verify=ca or True, environ=environ)

    def close(self) -> None:
        self._http.close()

    # -- routes ------------------------------------------------------------------------------
    def join(
        self,
        instance_id: str,
        *,
        rank: int | None,
        world_size: int | None,
        candidates: Sequence[Candidate],
        role: str | None = None,
    ) -> Joined:
        body = {
            "instance_id": check_instance_id(instance_id),
            "rank": rank,
            "world_size": world_size,
            "candidates": [{"host": c.host, "port": c.port} for c in candidates[:MAX_CANDIDATES]],
            "role": role,
        }
        data = self._call("POST", "join", json=body, what=f"join as rank {rank}")
        try:
            udp = data.get("udp")
            size = data.get("world_size")
            return Joined(
                instance_id=str(data["instance_id"]),
                rank=int(data["rank"]),
                world_size=None if size is None else int(size),
                token=base64.urlsafe_b64decode(_padded(str(data["token"]))),
                handle=_handle(data["handle"]),
                udp=None if udp is None else (str(udp["host"]), int(udp["port"])),
                heartbeat_interval_s=float(data["heartbeat_interval_s"]),
                ttl_s=float(data["ttl_s"]),
                generation=int(data["generation"]),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as err:
            raise StunServerError(f"{self.base}: a malformed join answer ({err!r})") from None

    def members(self, after_generation: int | None = None, timeout_s: float = 0.0) -> Members:
        """The cluster's members; with ``after_generation``, wait (up to ``timeout_s``) until
        its generation exceeds it."""
        params: dict[str, Any] = {}
        wait = min(max(timeout_s, 0.0), MAX_POLL_S)
        if after_generation is not None:
            params = {"after_generation": after_generation, "timeout_s": wait}
        data = self._call("GET", "members", params=params, extra_timeout=wait, what="members")
        try:
            members = tuple(_member(m) for m in data["members"])
            size = data.get("world_size")
            return Members(None if size is None else int(size), int(data["generation"]), members)
        except (KeyError, TypeError, ValueError) as err:
            raise StunServerError(f"{self.base}: a malformed members answer ({err!r})") from None

    def heartbeat(self, instance_id: str, candidates: Sequence[Candidate] | None = None) -> int:
        body = None
        if candidates is not None:
            body = {"candidates": [{"host": c.host, "port": c.port} for c in candidates]}
        data = self._call("POST", f"heartbeat/{instance_id}", json=body, what="heartbeat")
        return int(data.get("generation", 0))

    def leave(self, instance_id: str) -> None:
        self._call("DELETE", f"members/{instance_id}", what="leave")

    def post_event(self, from_instance: str, kind: str, body: Any) -> int:
        data = self._call(
            "POST", "events", json={"from_instance": from_instance, "kind": kind, "body": body},
            what="post an event",
        )  # fmt: skip
        return int(data["seq"])

    def events(self, after: int = 0, timeout_s: float = 0.0) -> list[ClusterEvent]:
        wait = min(max(timeout_s, 0.0), MAX_POLL_S)
        data = self._call(
            "GET", "events", params={"after": after, "timeout_s": wait}, extra_timeout=wait,
            what="events",
        )  # fmt: skip
        return [
            ClusterEvent(
                int(e["seq"]),
                str(e["from_instance"]),
                str(e["kind"]),
                e.get("body"),
                float(e.get("age_s", 0.0)),
            )
            for e in data.get("events", [])
        ]

    def _call(
        self,
        method: str,
        route: str,
        *,
        what: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        extra_timeout: float = 0.0,
    ) -> Any:
        import httpx

        url = f"/v1/clusters/{self.cluster_id}/{route}"
        try:
            answer = self._http.request(
                method, url, json=json, params=params, timeout=self.timeout + extra_timeout
            )
        except httpx.TimeoutException:
            raise RendezvousTimeoutError(
                f"the rendezvous server {SERVER_ENV}={self.base} did not answer ({what}) within "
                f"{self.timeout + extra_timeout:g} s"
            ) from None
        except httpx.HTTPError as err:
            if _is_verify_failure(err):
                trusted = f"{CA_FILE_ENV}={self.ca_file}" if self.ca_file else "the system's CAs"
                raise TlsVerifyError(
                    f"the rendezvous server {SERVER_ENV}={self.base} presented a TLS certificate "
                    f"that does not verify against {trusted} ({what}): set {CA_FILE_ENV} to the "
                    "CA that signed the server's certificate"
                ) from None
            raise RendezvousConnectionError(
                f"cannot reach the rendezvous server {SERVER_ENV}={self.base} ({what}): {err}"
            ) from None
        status = answer.status_code
        if status == 204:
            return {}
        if len(answer.content) > _MAX_BODY:
            raise StunServerError(f"{self.base}: an oversized answer to {what}", status)
        if 200 <= status < 300:
            try:
                return answer.json()
            except ValueError:
                raise StunServerError(f"{self.base}: {what} answered non-JSON", status) from None
        detail = _detail(answer)
        if status == 401:
            raise StunAuthError(
                f"the rendezvous server {self.base} refused {what} for cluster "
                f"{self.cluster_id!r}: check {KEY_ENV} and {CLUSTER_ID_ENV} (same on every "
                "instance and the server)",
                status,
            )
        if status == 404 and route.startswith("heartbeat/"):
            raise InstanceExpiredError(f"{self.base}: this instance expired ({detail})", status)
        if status == 409:
            raise StunConflictError(
                f"the rendezvous server {self.base} refused {what}: {detail} (another instance "
                "holds the rank, or the world size differs: check RANK/WORLD_SIZE and "
                f"{CLUSTER_ID_ENV})",
                status,
            )
        raise StunServerError(f"the rendezvous server {self.base}: {what}: {status} {detail}",
                              status)  # fmt: skip


class Heartbeat:
    """Heartbeats one instance every ``interval`` s from a daemon thread; on
    :class:`InstanceExpiredError` calls ``rejoin`` (a restarted server forgot it).  Failures are
    logged and retried: the server keeps soft state only, a missed beat costs nothing until
    ``ttl``."""

    def __init__(
        self,
        client: StunClient,
        instance_id: str,
        interval: float,
        rejoin: Callable[[], None],
        on_generation: Callable[[int], None] | None = None,
    ) -> None:
        self._client = client
        self._instance = instance_id
        self._interval = max(interval, 0.2)
        self._rejoin = rejoin
        self._on_generation = on_generation
        self._stop = threading.Event()
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="stun-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._client.timeout + 1.0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                generation = self._client.heartbeat(self._instance)
                if self._on_generation is not None:
                    self._on_generation(generation)
            except InstanceExpiredError:
                log.info("rendezvous: instance %s expired on the server; joining again",
                         self._instance)  # fmt: skip
                try:
                    self._rejoin()
                except RendezvousError as err:
                    self.failures += 1
                    log.warning("rendezvous: rejoin failed: %s", err)
            except RendezvousError as err:
                self.failures += 1
                log.warning("rendezvous: heartbeat failed: %s", err)


def _is_verify_failure(err: BaseException) -> bool:
    seen: BaseException | None = err
    for _ in range(8):  # httpx wraps httpcore's error, which wraps ssl's
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
            seen
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _padded(text: str) -> str:
    return text + "=" * (-len(text) % 4)


def _handle(value: Any) -> bytes:
    text = str(value)
    if not _HANDLE.fullmatch(text):
        raise ValueError(f"handle {text!r} is not 16 hex characters")
    return bytes.fromhex(text)


def _member(raw: Any) -> Member:
    cands = tuple(
        Candidate(str(c["host"]), int(c["port"]), str(c.get("kind", "local")))
        for c in raw.get("candidates", [])[: 2 * MAX_CANDIDATES]
    )
    role = raw.get("role")
    return Member(
        instance_id=str(raw["instance_id"]),
        rank=int(raw["rank"]),
        handle=_handle(raw["handle"]),
        role=None if role is None else str(role),
        candidates=cands,
        age_s=float(raw.get("age_s", 0.0)),
    )


def _detail(answer: Any) -> str:
    try:
        data = answer.json()
    except ValueError:
        return str(answer.text)[:200]
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:200]
    return str(data)[:200]


__all__ = [
    "ALLOW_HTTP_ENV",
    "CA_FILE_ENV",
    "CLUSTER_ID_ENV",
    "INSTANCE_ID_ENV",
    "SERVER_ENV",
    "Candidate",
    "ClusterEvent",
    "Heartbeat",
    "InstanceExpiredError",
    "Joined",
    "Member",
    "Members",
    "StunAuthError",
    "StunClient",
    "StunConflictError",
    "StunServerError",
    "TlsVerifyError",
    "server_url",
    "tls_context",
]
