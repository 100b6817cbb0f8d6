"""The cluster key: where it comes from, what it derives, how messages are authenticated with it.

One secret, ``COMFY_CLUSTER_KEY`` (or the file named by ``COMFY_CLUSTER_KEY_FILE``), is shared by
every rank of a cluster.  Nothing uses it directly: each use derives its own subkey with HKDF
(``ClusterKey.derive(label)``), so a MAC made for the rendezvous store can never be replayed as an
HTTP control request, and the UDP transport can later derive its session keys from the same root.

Two helpers are built on it here:

* :meth:`ClusterKey.mac` / :meth:`ClusterKey.verify`: HMAC-SHA256 over length-prefixed parts,
  compared in constant time (records, challenge-response);
* :class:`RequestSigner` / :class:`RequestVerifier`: an HTTP request credential (header
  :data:`AUTH_HEADER`) binding method, path, body and a timestamp, with a replay window.

Where no key is set, :func:`require_key` decides: loopback-only use may run without one; anything
listening on another address refuses to start unless ``COMFY_CLUSTER_INSECURE=1``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

from collectives.errors import AuthenticationError, ConfigurationError
from collectives.options import env_flag

KEY_ENV = "COMFY_CLUSTER_KEY"
KEY_FILE_ENV = "COMFY_CLUSTER_KEY_FILE"
INSECURE_ENV = "COMFY_CLUSTER_INSECURE"
AUTH_HEADER = "X-Comfy-Cluster-Auth"
_MIN_KEY_CHARS = 16
_VERSION = "v1"


def _length_prefixed(parts: tuple[bytes | str, ...]) -> bytes:
    # Unambiguous: ("ab", "c") and ("a", "bc") must not MAC alike.
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        out += struct.pack("<Q", len(raw))
        out += raw
    return bytes(out)


class ClusterKey:
    """The cluster's shared secret.  Its ``repr`` never shows it."""

    __slots__ = ("_secret", "_subkeys", "text")

    def __init__(self, text: str) -> None:
        text = text.strip()
        if len(text) < _MIN_KEY_CHARS:
            raise ConfigurationError(
                f"{KEY_ENV} is too short ({len(text)} characters, at least {_MIN_KEY_CHARS}): use "
                'e.g. python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        self.text = text  # what a launcher hands its children in the environment
        self._secret = text.encode("utf-8")
        self._subkeys: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"<ClusterKey fingerprint={self.fingerprint()}>"

    @classmethod
    def generate(cls) -> ClusterKey:
        """A fresh random key (what ``comfycluster-launch`` gives its children when none is set)."""
        return cls(secrets.token_urlsafe(32))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClusterKey | None:
        """The key from ``COMFY_CLUSTER_KEY`` or ``COMFY_CLUSTER_KEY_FILE``; None if neither."""
        env = os.environ if environ is None else environ
        text = env.get(KEY_ENV, "")
        path = env.get(KEY_FILE_ENV, "").strip()
        if text.strip() and path:
            raise ConfigurationError(f"set {KEY_ENV} or {KEY_FILE_ENV}, not both")
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as err:
                raise ConfigurationError(
                    f"{KEY_FILE_ENV}={path!r} cannot be read: {err.strerror or err}"
                ) from None
            if not text.strip():
                raise ConfigurationError(f"{KEY_FILE_ENV}={path!r} is empty")
        if not text.strip():
            return None
        return cls(text)

    def fingerprint(self) -> str:
        """A short public digest: lets two ranks compare keys in logs without revealing them."""
        return self.derive(b"fingerprint")[:6].hex()

    def derive(self, label: bytes, length: int = 32) -> bytes:
        """A subkey for one purpose (HKDF-SHA256, ``label`` as the info string)."""
        cache_key = label + struct.pack("<H", length)
        key = self._subkeys.get(cache_key)
        if key is None:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF

            key = HKDF(
                algorithm=hashes.SHA256(), length=length, salt=b"comfy-cluster/v1", info=label
            ).derive(self._secret)
            self._subkeys[cache_key] = key
        return key

    def mac(self, label: bytes, *parts: bytes | str) -> bytes:
        """HMAC-SHA256 of ``parts`` under the subkey for ``label`` (32 bytes)."""
        return hmac.new(self.derive(label), _length_prefixed(parts), hashlib.sha256).digest()

    def verify(self, label: bytes, tag: bytes, *parts: bytes | str) -> bool:
        """Whether ``tag`` is :meth:`mac` of ``parts`` (constant-time compare)."""
        return hmac.compare_digest(self.mac(label, *parts), tag)


def insecure_allowed(environ: Mapping[str, str] | None = None) -> bool:
    return env_flag(os.environ if environ is None else environ, INSECURE_ENV)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback only."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_key(
    host: str, what: str, environ: Mapping[str, str] | None = None
) -> ClusterKey | None:
    """The cluster key for something that listens on or connects to ``host``.

    Loopback may run without a key.  Any other address without a key raises
    :class:`ConfigurationError` naming the variable, unless ``COMFY_CLUSTER_INSECURE=1`` says the
    network is trusted.
    """
    key = ClusterKey.from_env(environ)
    if key is None and not is_loopback(host) and not insecure_allowed(environ):
        raise ConfigurationError(
            f"{what} would use {host}, which is not loopback, and no cluster key is set: set "
            f"{KEY_ENV} (the same secret on every rank; comfycluster-launch makes one for its "
            f"children) or {KEY_FILE_ENV}, or {INSECURE_ENV}=1 on a network you trust"
        )
    return key


_HTTP_LABEL = b"http-control"


class RequestSigner:
    """Makes the :data:`AUTH_HEADER` value for one HTTP request to another rank."""

    def __init__(self, key: ClusterKey) -> None:
        self._key = key

    def sign(self, method: str, path: str, body: bytes, now: float | None = None) -> str:
        stamp = f"{time.time() if now is None else now:.3f}"
        nonce = secrets.token_hex(12)
        tag = self._key.mac(_HTTP_LABEL, method.upper(), path, stamp, nonce, body)
        return f"{_VERSION}:{stamp}:{nonce}:{tag.hex()}"


class RequestVerifier:
    """Checks :data:`AUTH_HEADER` values: right MAC, fresh timestamp, never seen before.

    A credential is valid for ``window_s`` seconds either side of this host's clock; each nonce is
    remembered for that long, so a captured request cannot be replayed.  At most
    ``max_remembered`` nonces are: past that many fresh requests in one window, new ones are
    refused (never a fresh nonce forgotten, which would let its request be replayed).
    """

    def __init__(self, key: ClusterKey, window_s: float = 30.0, max_remembered: int = 65536):
        self._key = key
        self._window = window_s
        self._max = max_remembered
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(
        self, method: str, path: str, body: bytes, header: str | None, now: float | None = None
    ) -> None:
        """Return if the request is authentic; raise :class:`AuthenticationError` otherwise."""
        if not header:
            raise AuthenticationError(f"missing {AUTH_HEADER} header")
        fields = header.split(":")
        if len(fields) != 4 or fields[0] != _VERSION:
            raise AuthenticationError(f"malformed {AUTH_HEADER} header")
        _, stamp, nonce, tag_hex = fields
        try:
            sent = float(stamp)
            tag = bytes.fromhex(tag_hex)
        except ValueError:
            raise AuthenticationError(f"malformed {AUTH_HEADER} header") from None
        if len(nonce) > 64 or not self._key.verify(
            _HTTP_LABEL, tag, method.upper(), path, stamp, nonce, body
        ):
            raise AuthenticationError("request credential does not match the cluster key")
        now = time.time() if now is None else now
        if not abs(now - sent) <= self._window:
            raise AuthenticationError(
                f"request credential expired or from the future ({now - sent:+.1f} s; clocks must "
                f"agree within {self._window:g} s)"
            )
        horizon = now - self._window  # a nonce sent before this can no longer be replayed
        with self._lock:
            seen = self._seen
            while seen and next(iter(seen.values())) < horizon:
                seen.popitem(last=False)
            if nonce in seen:
                raise AuthenticationError("replayed request credential")
            if len(seen) >= self._max:
                # Kept in arrival order, not sending order (clocks differ): expired nonces may
                # sit behind fresh ones.
                for old in [n for n, stamp in seen.items() if stamp < horizon]:
                    del seen[old]
                if len(seen) >= self._max:
                    raise AuthenticationError(
                        f"too many requests: {self._max} in the last {self._window:g} s are "
                        "remembered against replay already; retry later"
                    )
            seen[nonce] = sent


__all__ = [
    "AUTH_HEADER",
    "INSECURE_ENV",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "ClusterKey",
    "RequestSigner",
    "RequestVerifier",
    "insecure_allowed",
    "is_loopback",
    "require_key",
]
