"""Worlds of udp ranks run as threads of the test process, for the tests/backends udp tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from collectives.communicator import Communicator
from collectives.world import init


def run_world(
    n: int,
    env: dict[str, str] | list[dict[str, str]],
    fn: Callable[[Communicator], Any],
    *,
    ranked: bool = True,
    timeout: float = 20.0,
) -> list[Any]:
    """``fn(comm)`` on ``n`` ranks (threads); the results in rank order.  ``ranked=False``
    starts them without rank/size: the server assigns them (results are still by rank)."""
    envs = env if isinstance(env, list) else [env] * n
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def main(index: int) -> None:
        try:
            if ranked:
                comm = init("udp", rank=index, size=n, environ=envs[index], timeout=timeout)
            else:
                comm = init(environ=envs[index], timeout=timeout)
        except BaseException as err:
            errors.append(err)
            return
        try:
            results[comm.rank] = fn(comm)
        except BaseException as err:
            errors.append(err)
            comm.abort(repr(err))
        finally:
            comm.close()

    threads = [threading.Thread(target=main, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout + 30
    for t in threads:
        t.join(max(end - time.monotonic(), 0.1))
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    assert sorted(results) == list(range(n)), sorted(results)
    return [results[r] for r in range(n)]
