"""Cluster keys: kept only as salted HMAC-SHA256 digests, compared in constant time.

Cluster keys are long random secrets (the launcher generates 32 bytes), so a fast keyed hash is
enough: what it protects against is a leaked database or memory dump giving the keys away, not
a dictionary attack on a human password.  An unknown cluster and a wrong key take the same path
(one HMAC, one ``compare_digest`` against a stand-in digest) and get the same answer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import HTTPException

UNAUTHORIZED_DETAIL = "unknown cluster or wrong cluster key"


def unauthorized() -> HTTPException:
    return HTTPException(
        status_code=401, detail=UNAUTHORIZED_DETAIL, headers={"WWW-Authenticate": "ApiKey"}
    )


class KeyHasher:
    def __init__(self, salt: bytes | None = None) -> None:
        self.salt = salt if salt is not None else secrets.token_bytes(32)
        # compared against when the cluster is unknown, so both failures cost the same
        self._stand_in = self.digest(secrets.token_urlsafe(32))

    def digest(self, key: str) -> bytes:
        return hmac.new(self.salt, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def matches(self, stored: bytes | None, key: str | None) -> bool:
        given = self.digest(key or "")
        same = hmac.compare_digest(stored if stored is not None else self._stand_in, given)
        return same and stored is not None and key is not None

    def admin_ok(self, admin_key: str | None, given: str | None) -> bool:
        if admin_key is None:
            return False
        return hmac.compare_digest(self.digest(admin_key), self.digest(given or ""))
