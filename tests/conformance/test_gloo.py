"""The conformance suite on torch.distributed gloo: ranks are real processes on loopback (the
destructive scenarios are in test_process_scenarios.py)."""

from __future__ import annotations

import pytest

from collectives.testing import CHECKS
from tests.conformance.worlds import check_result

pytestmark = pytest.mark.gloo


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check(name: str, size: int) -> None:
    check_result("gloo", size, name)
