"""Run an SPMD function on N in-process ranks (threads of the ``local`` backend)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from collectives.communicator import Communicator
from collectives.errors import (
    CollectiveTimeoutError,
    CommunicatorAbortedError,
    ConnectionLostError,
)
from collectives.world import init

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
    """
    world = f"run-local-{uuid.uuid4().hex}"
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def rank_main(rank: int) -> None:
        comm = init("local", rank=rank, size=size, world=world, timeout=op_timeout, **init_kwargs)
        try:
            results[rank] = fn(comm)
        except BaseException as err:
            errors[rank] = err
            comm.abort(f"rank {rank} raised {type(err).__name__}")
        finally:
            if close:
                comm.close()

    threads = [
        threading.Thread(target=rank_main, args=(r,), name=f"local-rank-{r}", daemon=True)
        for r in range(size)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise CollectiveTimeoutError(
            f"run_local: rank(s) {stuck} still running after {timeout} s", ranks=stuck
        )
    # Report the root cause: a rank's own failure, not the "peer left" errors it caused elsewhere.
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    secondary = (ConnectionLostError, CommunicatorAbortedError)
    failed.sort(key=lambda item: isinstance(item[1], secondary))
    if failed:
        rank, err = failed[0]
        err.add_note(f"(raised on local rank {rank} of {size})")
        raise err
    return results
