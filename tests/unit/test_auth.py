"""The cluster key's HTTP request credentials: the replay cache refuses rather than forgets, and
the environment's on/off switches."""

from __future__ import annotations

import pytest

from collectives.auth import ClusterKey, RequestSigner, RequestVerifier, insecure_allowed
from collectives.errors import AuthenticationError
from collectives.options import CommOptions, env_flag

KEY = ClusterKey("unit-test-cluster-key-0123456789")
NOW = 1_000_000.0


def _signed(now: float, body: bytes = b"{}") -> str:
    return RequestSigner(KEY).sign("POST", "/x", body, now=now)


def test_a_full_replay_cache_refuses_new_requests_instead_of_forgetting_fresh_ones() -> None:
    verifier = RequestVerifier(KEY, window_s=30.0, max_remembered=3)
    headers = [_signed(NOW) for _ in range(3)]
    for header in headers:
        verifier.verify("POST", "/x", b"{}", header, now=NOW)
    with pytest.raises(AuthenticationError, match="too many requests"):
        verifier.verify("POST", "/x", b"{}", _signed(NOW + 1), now=NOW + 1)
    for header in headers:  # none of the remembered ones was dropped to make room
        with pytest.raises(AuthenticationError, match="replayed"):
            verifier.verify("POST", "/x", b"{}", header, now=NOW + 1)
    # Once they expire they make room again (and could not be replayed anyway).
    later = NOW + 31
    verifier.verify("POST", "/x", b"{}", _signed(later), now=later)
    for header in headers:
        with pytest.raises(AuthenticationError, match="expired"):
            verifier.verify("POST", "/x", b"{}", header, now=later)


def test_expired_nonces_behind_fresh_ones_are_evicted_when_full() -> None:
    # Arrival order is not sending order: a fresh stamp first, then two older ones.
    verifier = RequestVerifier(KEY, window_s=30.0, max_remembered=3)
    for stamp in (NOW + 20, NOW, NOW + 1):
        verifier.verify("POST", "/x", b"{}", _signed(stamp), now=NOW + 20)
    verifier.verify("POST", "/x", b"{}", _signed(NOW + 40), now=NOW + 40)  # two had expired
    assert len(verifier._seen) == 2
    verifier.verify("POST", "/x", b"{}", _signed(NOW + 40), now=NOW + 40)
    with pytest.raises(AuthenticationError, match="too many requests"):
        verifier.verify("POST", "/x", b"{}", _signed(NOW + 40), now=NOW + 40)


@pytest.mark.parametrize(
    ("raw", "on"),
    [("1", True), (" true ", True), ("YES\n", True), ("on", True), ("0", False), ("", False)],
)
def test_env_flags_are_read_alike(raw: str, on: bool) -> None:
    assert env_flag({"X": raw}, "X") is on
    assert insecure_allowed({"COMFY_CLUSTER_INSECURE": raw}) is on
    options = CommOptions.from_env({"COMFY_CLUSTER_ALLOW_PICKLE": raw})
    assert options.codec.allow_pickle is on
