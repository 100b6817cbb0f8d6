"""The conformance suite on the udp backend: ranks are real processes on loopback, started by
the launcher (env discovery through rank 0's authenticated store, the launcher's cluster key); the
destructive scenarios are in test_process_scenarios.py."""

from __future__ import annotations

import pytest

from collectives.testing import CHECKS
from tests.conformance.worlds import check_result

pytestmark = pytest.mark.udp

SIZES = [1, 2, 3, 4, 5, 8]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check(name: str, size: int) -> None:
    check_result("udp", size, name)
