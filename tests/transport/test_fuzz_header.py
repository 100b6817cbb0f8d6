"""Random, truncated and bit-flipped datagrams never raise, never create state, and are counted."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from collectives.transport import Endpoint, TransportConfig
from collectives.transport.header import HEADER_SIZE
from tests.transport.pairs import KEY, Mesh, addr_of

DROPS = (
    "dropped_malformed",
    "dropped_wrong_cluster",
    "dropped_foreign",
    "dropped_unknown_session",
    "dropped_auth",
    "dropped_replay",
    "dropped_duplicate",
    "dropped_overload",
)


def _captured() -> list[bytes]:
    """Real datagrams of a short exchange: the seeds that mutations start from."""
    seen: list[bytes] = []

    def tamper(src: int, dst: int, data: bytes) -> list[bytes]:
        seen.append(data)
        return [data]

    mesh = Mesh(2, TransportConfig(max_datagram=600), tamper=tamper)
    mesh.endpoints[0].send(1, 0, b"m", [memoryview(bytes(3000))], mesh.now)
    mesh.run_until(lambda: len(seen) > 12)
    return seen


SEEDS = _captured()


def _fresh_server() -> Endpoint:
    ep = Endpoint(rank=1, size=2, comm_id=7, epoch=1, key=KEY, config=TransportConfig(), now=0.0)
    ep.add_peer(0, None, 0.0)
    return ep


def _check(ep: Endpoint, data: bytes) -> None:
    before = sum(ep.stats()[k] for k in DROPS)
    sessions = dict(ep._by_id)
    ep.receive(data, addr_of(0), 1.0)
    assert ep.next_event() is None
    assert ep._by_id == sessions
    assert sum(ep.stats()[k] for k in DROPS) == before + 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2 * HEADER_SIZE + 64))
def test_random_bytes(data: bytes) -> None:
    _check(_fresh_server(), data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SEEDS), st.data())
def test_truncated_or_bit_flipped_real_datagrams(seed: bytes, data: st.DataObject) -> None:
    mutated = bytearray(seed)
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            bit = data.draw(st.integers(0, len(mutated) * 8 - 1))
            mutated[bit // 8] ^= 1 << (bit % 8)
    assume(bytes(mutated) != seed)
    _check(_fresh_server(), bytes(mutated))
