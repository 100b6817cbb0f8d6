"""Deadlines: every blocking call turns its timeout into one absolute monotonic deadline."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

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


class Deadline:
    """An absolute point on the monotonic clock, with the context needed for a good error."""

    __slots__ = ("at", "op", "rank", "timeout")

    def __init__(self, timeout: float, op: str, rank: int, *, checked: bool = False) -> None:
        # ``checked``: the caller validated ``timeout`` already (a communicator's default),
        # which spares every op a float() and an isfinite().
        self.timeout = timeout if checked else check_timeout(timeout)
        self.at = time.monotonic() + self.timeout
        self.op = op
        self.rank = rank

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
