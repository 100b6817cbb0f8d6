"""Run an SPMD function on N in-process ranks (threads of the ``local`` backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from collectives.communicator import Communicator
from collectives.testing.spmd import run_threads

T = TypeVar("T")


def run_local(
    size: int,
    fn: Callable[[Communicator], T],
    *,
    timeout: float = 120.0,
    op_timeout: float | None = None,
    close: bool = True,
    **init_kwargs: Any,
) -> list[T]:
    """Call ``fn(comm)`` on ``size`` ranks at once and return each rank's result in rank order.

    The first rank's exception (in rank order) is re-raised with the rank noted.  A rank still
    running after ``timeout`` seconds raises ``CollectiveTimeoutError`` here instead of hanging
    the caller.  ``close=False`` leaves communicators open, as a crashed rank would.
    (:func:`collectives.testing.run_spmd` does the same on any backend.)
    """
    return run_threads(
        "local", size, fn, timeout=timeout, op_timeout=op_timeout, close=close, **init_kwargs
    )
