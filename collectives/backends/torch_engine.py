"""Deadlines, abort and error mapping around torch.distributed ``Work`` handles.

Collective works are waited for in short slices of ``work.wait(timeout=...)``: gloo honours it
and leaves the op running when a slice expires.  (Where ``wait(timeout)`` has side effects, as
with NCCL, which tears its communicator down, ``is_completed()`` is polled with a growing sleep.)
Between slices the abort flag and the op's :class:`~collectives.deadline.Deadline` are checked,
so no call outlives its timeout.

gloo's point-to-point works cannot be waited for in slices: ``is_completed()`` stays False until
someone waits, and a ``wait(timeout)`` that expires marks the work failed for good.  So they are
waited for once, on a helper thread (:class:`P2PJob`), with a limit past the op's deadline; the
caller waits on the job in slices and stays abortable.

gloo's ``RuntimeError`` texts are mapped onto the library's errors: a peer that closed or reset its
connection becomes :class:`ConnectionLostError` (naming the rank when the address or the op tells
which), gloo's own timer :class:`CollectiveTimeoutError`, anything else :class:`TransportError`
(after which the backend refuses further ops: peers may be left inside the failed op).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from collectives.errors import (
    CollectivesError,
    CommunicatorAbortedError,
    ConnectionLostError,
    InvalidArgumentError,
    TransportError,
)

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

    from collectives.backends.base import OpContext

# gloo's own per-op timer is set this much past our deadline: ours fires first and names ranks,
# and gloo's then frees its worker threads so that close() (destroy_process_group) cannot hang.
GRACE_S = 2.0
# Longest single blocking wait: how quickly abort() is noticed by a waiting thread.
WAIT_SLICE_S = 0.05
_MIN_SLICE_S = 0.002
_SLICE = timedelta(seconds=WAIT_SLICE_S)
_SECONDS: dict[int, timedelta] = {}
_POLL_SPIN_S = 50e-6
_POLL_MAX_SLEEP_S = 1e-3

# Tags: gloo matches point-to-point messages by (peer, tag), tags are non-negative int32.  The two
# low bits keep user channels apart from the backend's own traffic.
USER_SPACE, OBJECT_SPACE, RAW_SPACE, ACK_SPACE = 0, 1, 2, 3
MAX_USER_TAG = (1 << 29) - 1

_WAIT_SLICE_MSG = "Operation timed out!"
_CONNECTION_RE = re.compile(
    r"connection (closed|reset|refused|aborted)|broken pipe|read error|write error|"
    r"socket closed|ECONNRESET|EPIPE|ECONNREFUSED|peer .*(closed|crash)",
    re.IGNORECASE,
)
_TIMEOUT_RE = re.compile(r"timed out|timeout", re.IGNORECASE)
_ADDRESS_RE = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d+)")
_SOURCE_PREFIX_RE = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")


def user_tag(tag: int, op: str) -> int:
    if not isinstance(tag, int) or not 0 <= tag <= MAX_USER_TAG:
        raise InvalidArgumentError(
            f"{op}: tag={tag!r} is not supported by the torch backends: use 0..{MAX_USER_TAG}"
        )
    return (tag << 2) | USER_SPACE


def op_tag(space: int, seq: int) -> int:
    """The tag of one collective's point-to-point traffic (unique per op sequence number)."""
    return ((seq & MAX_USER_TAG) << 2) | space


def short_message(err: BaseException) -> str:
    """gloo's message without its source-file prefix and its boilerplate advice."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = _SOURCE_PREFIX_RE.sub("", text)
    for cut in (" This is typically caused", " Check the logs"):
        text = text.split(cut)[0]
    return text.strip()


class P2PJob:
    """Point-to-point works waited for on a helper thread, each with a completion flag."""

    def __init__(self, works: Sequence[tuple[Any, int]], limit_s: float) -> None:
        self.works = list(works)
        self.expired = False  # gloo's own limit passed: the works are dead, their data lost
        self.limit = timedelta(seconds=max(limit_s, _MIN_SLICE_S))
        self.completed = [False] * len(self.works)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.failed_peer: int | None = None
        self.keep: object = None  # memory the works use, alive until they end

    def run(self) -> None:
        try:
            for i, (work, peer) in enumerate(self.works):
                try:
                    work.wait(self.limit)
                except BaseException as err:
                    self.error, self.failed_peer = err, peer
                    self.expired = "timed out" in str(err).lower()
                    return
                self.completed[i] = True
        finally:
            self.done.set()

    def pending_peers(self) -> list[int]:
        return sorted(
            {peer for (_, peer), ok in zip(self.works, self.completed, strict=True) if not ok}
        )


class Engine:
    """One process group plus the state every op of a torch backend shares."""

    def __init__(
        self,
        pg: ProcessGroup,
        rank: int,
        size: int,
        *,
        engine_name: str,
        poll: bool,
        hosts: Mapping[int, str] | None = None,
    ) -> None:
        self.pg: ProcessGroup | None = pg
        self.rank = rank
        self.size = size
        self.engine_name = engine_name
        self.poll = poll
        self.hosts = dict(hosts or {})
        self.aborted: str | None = None
        self.failed: str | None = None
        self.lost: set[int] = set()
        self._lock = threading.Lock()
        self._channel_locks: dict[tuple[str, int, int], threading.Lock] = {}
        # Ops abandoned on an error or timeout may still be running inside gloo: their Work
        # handles and buffers are kept alive here until close() so no memory is freed under them.
        self._graveyard: list[object] = []
        # Receives abandoned half-way on a user channel, resumed by the next receive there.
        self.resumable: dict[tuple[int, int], Any] = {}
        # Helper threads for point-to-point waits.  Not daemons: the interpreter joins them at
        # exit (each is bounded by its op's deadline + GRACE_S), because a thread that returns
        # from a gloo wait while the interpreter finalises aborts the process.
        self._pool = ThreadPoolExecutor(
            max(64, 4 * size), thread_name_prefix=f"cc-{engine_name}-r{rank}-wait"
        )
        self.poisoned: set[tuple[int, int]] = set()
        # Peers that can read this process's memory (see collectives.backends.cma): the large
        # buffers of collective messages to them are read by them, not sent.
        self.cma_readers: frozenset[int] = frozenset()
        # Peers this process may read, with the pid each showed at the probe: an envelope that
        # asks for a read from anyone else (another rank, another pid) is refused.
        self.cma_sources: dict[int, int] = {}
        # The world every message envelope names (collectives.backends.envelope): set at create.
        self.comm = 0
        self.epoch = 0

    # -- state ---------------------------------------------------------------------------------
    def check_usable(self, op: str) -> None:
        if self.aborted is not None:
            raise CommunicatorAbortedError(
                f"{op} on rank {self.rank}: the communicator was aborted ({self.aborted})"
            )
        if self.failed is not None:
            raise CommunicatorAbortedError(
                f"{op} on rank {self.rank}: the {self.engine_name} backend is unusable after an "
                f"earlier failure ({self.failed}); create a new communicator"
            )

    def channel_lock(self, kind: str, peer: int, tag: int) -> threading.Lock:
        key = (kind, peer, tag)
        with self._lock:
            lock = self._channel_locks.get(key)
            if lock is None:
                lock = self._channel_locks[key] = threading.Lock()
            return lock

    def bury(self, *things: object) -> None:
        with self._lock:
            self._graveyard.extend(things)

    def release(self, *, forget_abandoned: bool) -> None:
        """Drop the process group (closing); abandoned buffers too once nothing can fill them."""
        self.pg = None
        if forget_abandoned:
            with self._lock:
                self._graveyard.clear()
                self.resumable.clear()
        self._pool.shutdown(wait=False)

    def group(self) -> ProcessGroup:
        pg = self.pg
        if pg is None:
            raise CommunicatorAbortedError(
                f"rank {self.rank}: the {self.engine_name} backend is closed"
            )
        return pg

    def op_timeout(self, ctx: OpContext) -> timedelta:
        """gloo's own timer for an op: a little past our deadline (see ``GRACE_S``).

        Rounded up to whole seconds so that the (hot) timedelta objects are reused.
        """
        seconds = int(ctx.deadline.remaining() + GRACE_S) + 1
        found = _SECONDS.get(seconds)
        if found is None:
            found = _SECONDS[seconds] = timedelta(seconds=seconds)
        return found

    # -- issuing -------------------------------------------------------------------------------
    def issue(
        self, start: Callable[[], Any], ctx: OpContext, ranks: Sequence[int], *, exact: bool = False
    ) -> Any:
        """Run ``start`` (which posts one op and returns its Work), mapping engine errors."""
        self.check_usable(ctx.name)
        try:
            return start()
        except RuntimeError as err:
            raise self.map_error(err, ctx, ranks, exact=exact) from None

    def post_send(self, tensor: torch.Tensor, dst: int, tag: int, ctx: OpContext) -> Any:
        return self.issue(lambda: self.group().send([tensor], dst, tag), ctx, [dst], exact=True)

    def post_recv(self, tensor: torch.Tensor, src: int, tag: int, ctx: OpContext) -> Any:
        return self.issue(lambda: self.group().recv([tensor], src, tag), ctx, [src], exact=True)

    # -- waiting -------------------------------------------------------------------------------
    def wait(
        self,
        work: Any,
        ctx: OpContext,
        ranks: Sequence[int],
        *,
        exact: bool = False,
        silent: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        """Wait for ``work`` until the op's deadline.

        ``ranks`` are the peers this work waits on: a timeout names them (or ``silent()``, the
        peers still missing when there is a better answer), and a lost connection blames them
        when ``exact`` (point-to-point) or when the engine's message does not say who.
        """
        dl = ctx.deadline
        if self.poll:
            self._poll(work, ctx, ranks, silent)
            try:
                work.wait()
            except RuntimeError as err:
                raise self.map_error(err, ctx, ranks, exact=exact) from None
            return
        while True:
            if self.aborted is not None:
                self._check_abort(ctx)
            remaining = dl.remaining()
            if remaining <= 0:
                raise dl.error(silent() if silent is not None else ranks)
            # Never below 1 ms: torch reads a zero timeout as "no timeout" (wait forever).
            if remaining >= WAIT_SLICE_S:
                piece = _SLICE
            else:
                piece = timedelta(seconds=max(remaining, _MIN_SLICE_S))
            try:
                done = work.wait(piece)
            except RuntimeError as err:
                if _WAIT_SLICE_MSG in str(err) or not work.is_completed():
                    continue
                raise self.map_error(err, ctx, ranks, exact=exact) from None
            if done is False and not work.is_completed():
                continue
            return

    def _poll(
        self,
        work: Any,
        ctx: OpContext,
        ranks: Sequence[int],
        silent: Callable[[], Iterable[int]] | None,
    ) -> None:
        dl = ctx.deadline
        spin_until = time.monotonic() + _POLL_SPIN_S
        pause = 10e-6
        while not work.is_completed():
            self._check_abort(ctx)
            now = time.monotonic()
            if now >= dl.at:
                raise dl.error(silent() if silent is not None else ranks)
            if now < spin_until:
                continue
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_SLEEP_S)

    def start(
        self, works: Sequence[tuple[Any, int]], ctx: OpContext, *, extra_s: float = GRACE_S
    ) -> P2PJob:
        """Wait for point-to-point ``(work, peer)`` pairs on a helper thread."""
        job = P2PJob(works, ctx.deadline.remaining() + extra_s)
        if job.works:
            self._pool.submit(job.run)
        else:
            job.done.set()
        return job

    def wait_job(
        self, job: P2PJob, ctx: OpContext, *, silent: Callable[[], Iterable[int]] | None = None
    ) -> None:
        """Wait for ``job`` until the op's deadline; a timeout names the peers still pending."""
        dl = ctx.deadline
        while not job.done.is_set():
            self._check_abort(ctx)
            remaining = dl.remaining()
            if remaining <= 0:
                raise dl.error(silent() if silent is not None else job.pending_peers())
            job.done.wait(min(remaining, WAIT_SLICE_S))
        if job.error is not None:
            peer = [] if job.failed_peer is None else [job.failed_peer]
            raise self.map_error(job.error, ctx, peer, exact=True)

    def wait_all(self, works: Sequence[tuple[Any, int]], ctx: OpContext) -> None:
        """Wait for point-to-point ``(work, peer)`` pairs until the op's deadline."""
        self.wait_job(self.start(works, ctx), ctx)

    def _check_abort(self, ctx: OpContext) -> None:
        if self.aborted is not None:
            raise CommunicatorAbortedError(
                f"{ctx.name} on rank {self.rank}: the communicator was aborted ({self.aborted})"
            )

    # -- errors --------------------------------------------------------------------------------
    def map_error(
        self, err: BaseException, ctx: OpContext, ranks: Sequence[int], *, exact: bool = False
    ) -> CollectivesError:
        if isinstance(err, CollectivesError):
            return err
        text = str(err)
        short = short_message(err)
        if _CONNECTION_RE.search(text):
            blamed = self._blame(text, ranks, exact)
            with self._lock:
                self.lost.update(blamed)
            who = ", ".join(str(r) for r in blamed) if blamed else "unknown (gloo does not say)"
            return ConnectionLostError(
                f"{ctx.name} on rank {self.rank}: lost the connection to rank(s) {who} "
                f"({self.engine_name}: {short}); the peer process probably exited or crashed",
                ranks=blamed,
            )
        if _TIMEOUT_RE.search(text):
            return ctx.deadline.error(ranks, detail=f"{self.engine_name}: {short}")
        self.failed = self.failed or f"{type(err).__name__}: {short}"
        return TransportError(
            f"{ctx.name} on rank {self.rank}: torch.distributed ({self.engine_name}) failed: "
            f"{short}"
        )

    def _blame(self, text: str, ranks: Sequence[int], exact: bool) -> list[int]:
        if exact:
            return sorted(set(ranks))
        match = _ADDRESS_RE.search(text)
        if match and self.hosts:
            address = match.group(1).removeprefix("::ffff:")
            owners = [r for r, h in self.hosts.items() if h == address and r != self.rank]
            if len(owners) == 1:
                return owners
        if len(ranks) == 1:
            return list(ranks)
        if self.size == 2:
            return [1 - self.rank]
        return []


__all__ = [
    "GRACE_S",
    "MAX_USER_TAG",
    "OBJECT_SPACE",
    "RAW_SPACE",
    "USER_SPACE",
    "Engine",
    "op_tag",
    "short_message",
    "user_tag",
]
