"""Frame sealing, per-direction session keys and the replay window."""

from __future__ import annotations

from collectives.auth import ClusterKey
from collectives.transport.crypto import (
    NullCipher,
    ReplayWindow,
    cluster_tag,
    session_ciphers,
)

KEY = ClusterKey("crypto-test-cluster-key-0123456789")
CN, SN = b"c" * 16, b"s" * 16


def seal(cipher, number: int, aad: bytes, plain: bytes) -> bytearray:  # type: ignore[no-untyped-def]
    out = bytearray(len(plain) + cipher.overhead)
    cipher.seal_into(number, aad, plain, memoryview(out))
    return out


def test_frames_open_only_with_the_right_key_nonce_and_aad() -> None:
    c2s, s2c = session_ciphers(KEY, CN, SN, 1, 0)
    peer_c2s, _ = session_ciphers(KEY, CN, SN, 1, 0)
    sealed = seal(c2s, 10, b"aad", b"hello frame")
    out = memoryview(bytearray(11))
    assert peer_c2s.open_into(10, b"aad", sealed, out) and out == b"hello frame"
    assert not peer_c2s.open_into(11, b"aad", sealed, out)  # other packet number
    assert not peer_c2s.open_into(10, b"aab", sealed, out)  # other header
    assert not s2c.open_into(10, b"aad", sealed, out)  # the other direction's key
    flipped = bytearray(sealed)
    flipped[3] ^= 1
    assert not peer_c2s.open_into(10, b"aad", flipped, out)


def test_keys_depend_on_both_nonces_comm_and_epoch() -> None:
    base, _ = session_ciphers(KEY, CN, SN, 1, 0)
    sealed = seal(base, 1, b"", b"x" * 32)
    out = memoryview(bytearray(32))
    for args in ((CN, b"t" * 16, 1, 0), (b"d" * 16, SN, 1, 0), (CN, SN, 2, 0), (CN, SN, 1, 1)):
        other, _ = session_ciphers(KEY, *args)
        assert not other.open_into(1, b"", sealed, out)
    other_key, _ = session_ciphers(ClusterKey("another-key-0123456789abc"), CN, SN, 1, 0)
    assert not other_key.open_into(1, b"", sealed, out)


def test_cluster_tag_and_insecure_mode() -> None:
    assert cluster_tag(KEY) == cluster_tag(ClusterKey(KEY.text)) != cluster_tag(None)
    assert len(cluster_tag(KEY)) == 4
    c2s, _ = session_ciphers(None, CN, SN, 1, 0)
    assert isinstance(c2s, NullCipher)
    assert seal(c2s, 1, b"", b"plain") == b"plain"


def test_replay_window_accepts_each_number_once_in_any_order() -> None:
    w = ReplayWindow(max_intervals=4)
    w.add(0, 5)
    w.add(20, 25)  # a gap: 5..20 still acceptable
    assert 3 in w and 22 in w and 10 not in w
    assert w.seen_any(4, 6) and not w.seen_any(5, 20)
    w.add(5, 20)  # the late frame fills the gap: one interval again
    assert w.intervals(10) == [(0, 25)]
    for start in range(30, 80, 10):  # five more gaps: the oldest are given up
        w.add(start, start + 2)
    assert len(w.intervals(100)) == 4
    assert 26 in w  # below the floor: refused as too old to tell
    assert w.floor > 25
    assert 79 not in w
