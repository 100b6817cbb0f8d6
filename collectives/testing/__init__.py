"""Reusable test support: run N local ranks as threads, and the backend conformance suite.

Shipped with the library so that a third-party backend can prove itself with the same checks:

    from collectives.testing import run_local, CHECKS
    for check in CHECKS.values():
        run_local(3, check)
"""

from collectives.testing.conformance import CHECKS, SCENARIOS
from collectives.testing.local import run_local
from collectives.testing.payloads import PAYLOADS, assert_same, payload

__all__ = ["CHECKS", "PAYLOADS", "SCENARIOS", "assert_same", "payload", "run_local"]
