"""Work handles: the result of an asynchronous (``i``-prefixed) operation, and the elastic pool
that runs asynchronous point-to-point ops.

Blocking calls are the asynchronous call plus ``wait()``, as in torch.distributed; a handle that
is already complete costs nothing to wait on.
"""

from __future__ import annotations

import queue
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


Job = Callable[[], None]


class ElasticPool:
    """Runs each submitted job on an idle thread, or on a new one when none is idle.

    There is no upper bound: jobs may block on each other (an ``irecv`` waiting for a message
    that another job's ``isend`` on the peer produces), and any fixed number of threads lets
    that many blocked jobs starve the one that would free them.  A thread idle for ``idle_s``
    seconds exits, so a burst of jobs leaves nothing behind.  Each idle thread waits on its own
    inbox; :meth:`submit` hands a job to one of them under the pool's lock, so a job is never
    given to a thread that is about to exit.
    """

    def __init__(self, name: str, idle_s: float = 5.0) -> None:
        self._name = name
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Job | None]] = []
        self._started = 0
        self._closed = False

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: the pool is shut down")
            if self._idle:
                self._idle.pop().put(job)
                return
            self._started += 1
            number = self._started
        thread = threading.Thread(
            target=self._serve, args=(job,), name=f"{self._name}-{number}", daemon=True
        )
        thread.start()

    def idle_threads(self) -> int:
        with self._lock:
            return len(self._idle)

    def shutdown(self) -> None:
        """Idle threads exit now; running jobs finish (they end by their own deadlines)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)

    def _serve(self, job: Job | None) -> None:
        while job is not None:
            job()
            inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
            with self._lock:
                if self._closed:
                    return
                self._idle.append(inbox)
            try:
                job = inbox.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:
                        self._idle.remove(inbox)
                        return
                # submit() took this inbox just before the timeout: its job is on the way.
                job = inbox.get()
