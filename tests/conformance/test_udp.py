"""The conformance suite on the udp backend: ranks are real processes on loopback, started by
the launcher (env discovery through rank 0's authenticated store, the launcher's cluster key); the
destructive scenarios are in test_process_scenarios.py.  Ranks of one host pass small messages
through shared-memory rings, run small collectives in a shared arena (collectives.backends.udp_shm,
udp_arena) and copy large bodies out of each other (udp_cma); a second run with cross-memory
attach off (and so rings and arena too) sends everything through the socket, as between hosts,
and a third keeps the copies but turns rings and arena off."""

from __future__ import annotations

import pytest

from collectives.backends import cma, shm_ring
from collectives.testing import CHECKS
from tests.conformance.worlds import check_result

pytestmark = pytest.mark.udp

SIZES = [1, 2, 3, 4, 5, 8]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check(name: str, size: int) -> None:
    check_result("udp", size, name)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_through_the_socket(name: str, size: int) -> None:
    check_result("udp", size, name, environ=((cma.ENV, "0"),))


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_without_rings(name: str) -> None:
    check_result("udp", 3, name, environ=((shm_ring.ENV, "0"),))
