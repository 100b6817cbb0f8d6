"""Deadlines: every blocking call turns its timeout into one absolute monotonic deadline."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import NamedTuple

from collectives.errors import CollectiveTimeoutError, ConfigurationError

TIMEOUT_ENV = "COMFY_CLUSTER_TIMEOUT"


def check_timeout(timeout: float | str, what: str = "timeout") -> float:
    """Validate a timeout in seconds.  Infinite waits are refused: nothing may hang forever."""
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what}={timeout!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(
            f"{what}={timeout!r} must be a positive, finite number of seconds "
            f"(the default comes from {TIMEOUT_ENV})"
        )
    return value


class Deadline(NamedTuple):
    """An absolute point on the monotonic clock, with the context needed for a good error.

    A NamedTuple so that an op's deadline is built without running Python code
    (:meth:`start` for callers; the communicator's per-op path builds the tuple itself).
    """

    at: float
    timeout: float
    op: str
    rank: int

    @classmethod
    def start(cls, timeout: float, op: str, rank: int, *, checked: bool = False) -> Deadline:
        """The deadline ``timeout`` seconds from now.  ``checked``: the caller validated
        ``timeout`` already (a communicator's default), which spares a float() and isfinite()."""
        value = timeout if checked else check_timeout(timeout)
        return cls(time.monotonic() + value, value, op, rank)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def error(self, ranks: Iterable[int], detail: str = "") -> CollectiveTimeoutError:
        missing = sorted(set(ranks))
        who = ", ".join(str(r) for r in missing) if missing else "unknown (engine does not say)"
        extra = f"; {detail}" if detail else ""
        return CollectiveTimeoutError(
            f"{self.op} on rank {self.rank} timed out after {self.timeout:g} s waiting for "
            f"rank(s) {who}{extra} (raise timeout= or {TIMEOUT_ENV} if they are just slow)",
            ranks=missing,
            op=self.op,
        )
