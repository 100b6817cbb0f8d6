"""Work handles: the result of an asynchronous (``i``-prefixed) operation.

Blocking calls are the asynchronous call plus ``wait()``, as in torch.distributed; a handle that
is already complete costs nothing to wait on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from collectives.deadline import check_timeout
from collectives.errors import CollectiveTimeoutError

T = TypeVar("T")


class Work(Generic[T]):
    """A pending operation.  ``wait()`` returns its result or raises its error."""

    __slots__ = ("_callbacks", "_done", "_error", "_event", "_result", "op", "rank")

    # One lock for all handles: creating a lock (and an Event) per op cost more than the
    # engine's own call for small messages; contention is negligible.
    _lock = threading.Lock()

    def __init__(self, op: str, rank: int) -> None:
        self.op = op
        self.rank = rank
        self._done = False
        self._event: threading.Event | None = None  # created only if somebody must block
        self._result: T | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Work[T]], None]] | None = None

    @classmethod
    def completed(cls, op: str, rank: int, result: T) -> Work[T]:
        work: Work[T] = cls(op, rank)
        work.set_result(result)
        return work

    # -- producer side ---------------------------------------------------------------------
    def set_result(self, result: T) -> None:
        self._result = result
        self._finish()

    def resolve_unshared(self, result: T) -> None:
        """:meth:`set_result` for a handle nobody else holds yet: no lock, no event, no callback."""
        self._result = result
        self._done = True

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._done = True
            event, callbacks = self._event, self._callbacks
            self._callbacks = None
        if event is not None:
            event.set()
        for callback in callbacks or ():
            callback(self)

    # -- consumer side ---------------------------------------------------------------------
    def is_completed(self) -> bool:
        return self._done

    def is_success(self) -> bool:
        return self._done and self._error is None

    def exception(self) -> BaseException | None:
        """The error the op ended with, or None (also None while it is still running)."""
        return self._error

    def wait(self, timeout: float | None = None) -> T:
        """Block until the op ends and return its result.

        ``timeout`` bounds this wait only; the op keeps its own deadline and may still finish.
        """
        if not self._done:
            self._block(None if timeout is None else check_timeout(timeout))
        if not self._done:
            raise CollectiveTimeoutError(
                f"{self.op} on rank {self.rank} still running after wait(timeout={timeout:g})",
                op=self.op,
            )
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    result = wait

    def _block(self, timeout: float | None) -> None:
        with self._lock:
            if self._done:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        # timeout=None is safe: the op carries its own deadline, so this wait still ends.
        event.wait(timeout)

    def add_done_callback(self, callback: Callable[[Work[T]], None]) -> None:
        with self._lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        callback(self)

    def __repr__(self) -> str:
        state = "done" if self.is_completed() else "pending"
        if self._error is not None:
            state = f"failed: {type(self._error).__name__}"
        return f"<Work {self.op} rank={self.rank} {state}>"
