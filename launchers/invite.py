"""Invite tokens: everything a machine needs to join a cluster through the rendezvous server.

A token is ``ccinv1.<payload>.<check>``: ``payload`` is the base64url (unpadded) JSON object
``{"server", "cluster_id", "key", "expires", "world_size"}`` (``expires`` in Unix seconds,
``world_size`` optional), ``check`` the first 6 bytes of SHA-256 over ``ccinv1.<payload>``, in
base64url.  The check catches a mistyped or truncated token with a clear message; it is not a
signature (anyone can make a well-formed token, and only the key inside it counts).

The token **contains the cluster key**: it is a secret.  Anyone holding it can join the
cluster (and read and forge its traffic) until the key is rotated on the server and the ranks.
``expires`` only makes this project's tools (``comfycluster-launch --join``, ``comfycluster
doctor``) refuse an old token, so a token found in a chat log later is not used by accident; it
does not stop someone who decodes the token and uses the key directly.  To revoke an invite,
rotate the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from collectives.auth import KEY_ENV, ClusterKey
from collectives.errors import ConfigurationError
from collectives.rendezvous.stun_client import CLUSTER_ID_ENV, SERVER_ENV, check_instance_id

PREFIX = "ccinv"
VERSION = 1
MAX_TOKEN_CHARS = 4096  # a real token is ~250 characters; longer is refused before decoding
MAX_LIFETIME_S = 365 * 86400
_CHECK_BYTES = 6
_WHITESPACE = re.compile(r"\s+")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
NEW_INVITE_HINT = (
    "ask the cluster's leader for a new one (comfycluster invite --server URL --cluster-id ID)"
)


class InviteError(ConfigurationError):
    """The invite token cannot be used (a subclass says why)."""


class InviteMalformedError(InviteError):
    """Not a token, mistyped, truncated, or with fields this version cannot use."""


class InviteVersionError(InviteError):
    """A token of another format version (made by a newer or older comfycluster)."""


class InviteExpiredError(InviteError):
    """The token's expiry has passed."""

    def __init__(self, message: str, expired_at: float) -> None:
        super().__init__(message)
        self.expired_at = expired_at


@dataclass(frozen=True)
class Invite:
    """What a token carries.  ``repr`` never shows the key."""

    server: str
    cluster_id: str
    key: str
    expires: int  # Unix seconds
    world_size: int | None = None

    def __repr__(self) -> str:
        return (
            f"Invite(server={self.server!r}, cluster_id={self.cluster_id!r}, key=<fingerprint "
            f"{ClusterKey(self.key).fingerprint()}>, expires={self.expires}, "
            f"world_size={self.world_size})"
        )

    def env(self) -> dict[str, str]:
        """The variables of ``stun`` discovery this invite stands for."""
        return {
            "COMFY_CLUSTER_REGISTRATION_MODE": "stun",
            SERVER_ENV: self.server,
            CLUSTER_ID_ENV: self.cluster_id,
            KEY_ENV: self.key,
        }

    def expires_text(self) -> str:
        return _utc(self.expires)


def make_token(invite: Invite) -> str:
    """The token of ``invite`` (checked first: a token this module would refuse is never made)."""
    _check_fields(invite.server, invite.cluster_id, invite.key, invite.expires, invite.world_size)
    body: dict[str, Any] = {
        "server": invite.server,
        "cluster_id": invite.cluster_id,
        "key": invite.key,
        "expires": int(invite.expires),
    }
    if invite.world_size is not None:
        body["world_size"] = invite.world_size
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    head = f"{PREFIX}{VERSION}.{_b64(raw)}"
    return f"{head}.{_check(head)}"


def parse_token(token: str, *, now: float | None = None, what: str = "--join") -> Invite:
    """The invite in ``token``; an :class:`InviteError` subclass naming ``what`` otherwise.

    Whitespace anywhere is ignored (a token wrapped by a terminal or a chat client still
    parses).  ``now`` (default: the clock) decides expiry.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise InviteMalformedError(
            f"{what}: the invite token is {len(token)} characters long (at most "
            f"{MAX_TOKEN_CHARS}): paste the token exactly as `comfycluster invite` printed it"
        )
    text = _WHITESPACE.sub("", token)
    parts = text.split(".")
    if not text.startswith(PREFIX) or len(parts) != 3:
        raise InviteMalformedError(
            f"{what}: not an invite token (one starts with '{PREFIX}{VERSION}.' and has three "
            f"dot-separated parts): paste the whole token that `comfycluster invite` printed"
        )
    version = parts[0][len(PREFIX) :]
    if version != str(VERSION):
        raise InviteVersionError(
            f"{what}: the invite token has format version {version!r}, this comfycluster reads "
            f"version {VERSION}: use the same comfycluster version on both machines, or "
            f"{NEW_INVITE_HINT} with this version"
        )
    head = f"{parts[0]}.{parts[1]}"
    if parts[2] != _check(head):
        raise InviteMalformedError(
            f"{what}: the invite token's check does not match: it was mistyped or cut short; "
            "copy it again (whole, e.g. with the clipboard)"
        )
    try:
        body = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise InviteMalformedError(f"{what}: the invite token's payload is not a JSON object")
    try:
        server, cluster, key = str(body["server"]), str(body["cluster_id"]), str(body["key"])
        expires = body["expires"]
        size = body.get("world_size")
    except KeyError as missing:
        raise InviteMalformedError(f"{what}: the invite token lacks {missing}") from None
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise InviteMalformedError(f"{what}: the invite token's expiry is not a number")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise InviteMalformedError(f"{what}: the invite token's world size is not a number")
    _check_fields(server, cluster, key, expires, size, what=what)
    clock = time.time() if now is None else now
    if expires <= clock:
        raise InviteExpiredError(
            f"{what}: the invite token expired at {_utc(expires)} ({_ago(clock - expires)} ago): "
            f"{NEW_INVITE_HINT}",
            expired_at=float(expires),
        )
    return Invite(server, cluster, key, expires, size)


def parse_duration(text: str, what: str = "--expires") -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d``, ``2w`` as seconds (at most a year)."""
    match = _DURATION.fullmatch(text.strip().lower())
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else -1.0
    if not 0 < seconds <= MAX_LIFETIME_S:
        raise ConfigurationError(
            f"{what} {text!r} is not a duration between 1 s and 365 d: write e.g. 30m, 24h or 7d"
        )
    return seconds


def _check_fields(
    server: str,
    cluster: str,
    key: str,
    expires: int,
    size: int | None,
    *,
    what: str = "the invite",
) -> None:
    try:
        check_instance_id(cluster, CLUSTER_ID_ENV)
        ClusterKey(key)  # the same length rule every rank applies
    except ConfigurationError as err:
        raise InviteMalformedError(f"{what}: {err}") from None
    if not server.startswith(("http://", "https://")) or len(server) > 512:
        raise InviteMalformedError(f"{what}: the server {server[:80]!r} is not an http(s) URL")
    if expires <= 0:
        raise InviteMalformedError(f"{what}: the expiry {expires} is not a time")
    if size is not None and not 1 <= size <= 65536:
        raise InviteMalformedError(f"{what}: the world size {size} is not in 1..65536")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _check(head: str) -> str:
    return _b64(hashlib.sha256(head.encode()).digest()[:_CHECK_BYTES])


def _utc(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


__all__ = [
    "MAX_TOKEN_CHARS",
    "PREFIX",
    "VERSION",
    "Invite",
    "InviteError",
    "InviteExpiredError",
    "InviteMalformedError",
    "InviteVersionError",
    "make_token",
    "parse_duration",
    "parse_token",
]
