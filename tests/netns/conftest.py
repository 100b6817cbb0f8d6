"""NAT topologies in network namespaces: the skip rule and the common topologies as fixtures.

Every test under tests/netns is marked `netns` (select or leave them out with -m).  They need
root, `ip netns`, nftables and conntrack; elsewhere they are skipped with the reason, never run
half-way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.netns.topology import NatKind, Topology, nat_topology, netns_unavailable_reason

HERE = Path(__file__).resolve().parent
TopologyFactory = Callable[..., Topology]


@functools.cache
def netns_skip_reason() -> str | None:
    """Why these tests cannot run on this machine (None: they can); asked once a session."""
    return netns_unavailable_reason()


def netns_available() -> bool:
    return netns_skip_reason() is None


@pytest.hookimpl(tryfirst=True)  # before -m selection reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _require_netns() -> None:
    if reason := netns_skip_reason():
        pytest.skip(reason)


@pytest.fixture
def make_topology() -> Iterator[TopologyFactory]:
    """`make_topology(kinds, hosts_per_site=1, udp_timeout_s=None)`: built now, removed when
    the test ends (pass or fail)."""
    with ExitStack() as stack:

        def make(kinds: Sequence[NatKind], **kwargs: object) -> Topology:
            return stack.enter_context(nat_topology(kinds, **kwargs))  # type: ignore[arg-type]

        yield make


def _module_topology(kinds: Sequence[NatKind], hosts_per_site: int = 1) -> Iterator[Topology]:
    if reason := netns_skip_reason():
        pytest.skip(reason)
    with nat_topology(kinds, hosts_per_site=hosts_per_site) as topo:
        yield topo


@pytest.fixture(scope="module")
def all_kinds() -> Iterator[Topology]:
    """One site of each kind, one host each; site i is ALL_KINDS[i]."""
    yield from _module_topology(ALL_KINDS)


@pytest.fixture(scope="module")
def restricted_pair() -> Iterator[Topology]:
    """Two port-restricted sites (the common home-router case): direct punching works."""
    yield from _module_topology([NatKind.PORT_RESTRICTED] * 2)


@pytest.fixture(scope="module")
def symmetric_pair() -> Iterator[Topology]:
    """Two symmetric sites: punching fails, only a relay through the server gets through."""
    yield from _module_topology([NatKind.SYMMETRIC] * 2)


@pytest.fixture(scope="module")
def four_ranks_two_sites() -> Iterator[Topology]:
    """Two port-restricted sites with two hosts each (four ranks, two per LAN)."""
    yield from _module_topology([NatKind.PORT_RESTRICTED] * 2, hosts_per_site=2)


ALL_KINDS = (
    NatKind.FULL_CONE,
    NatKind.PORT_RESTRICTED,
    NatKind.SYMMETRIC,
    NatKind.UDP_BLOCKED,
    NatKind.NONE,
)
