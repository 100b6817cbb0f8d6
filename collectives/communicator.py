"""The Communicator: the one object users hold.

Argument checking, encoding and ordering live here, once; backends only move bytes.  Blocking
calls are the asynchronous call plus ``wait()``; when nothing asynchronous is pending, a blocking
collective runs inline on the caller's thread so that thin wrappers over MPI and gloo add no
thread hop to the engine's own time.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from collectives.backends.base import Backend, FastLane, OpContext
from collectives.buffer_api import BufferOps
from collectives.codec import Encoded, decode, encode
from collectives.deadline import Deadline, check_timeout
from collectives.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CommunicatorAbortedError,
    ConnectionLostError,
    InvalidArgumentError,
    RemoteProtocolError,
)
from collectives.options import CommOptions
from collectives.work import ElasticPool, Work

T = TypeVar("T")

_tuple_new = tuple.__new__
_monotonic = time.monotonic

# Failures after which messages of the failed op may still be in flight: the communicator can no
# longer tell them from the next op's, so it refuses further ops (as NCCL does after an error).
# A peer's message that cannot be decoded (RemoteProtocolError, CodecError) counts too: the peer
# is broken or hostile, and the op's other messages may still be on their way.
_FATAL = (CollectiveTimeoutError, CollectiveMismatchError, ConnectionLostError, RemoteProtocolError)


class Communicator(BufferOps):
    """A group of ``size`` ranks; this object is rank ``rank`` of it.

    Object API (any picklable value, tensors travel out of band): :meth:`broadcast`,
    :meth:`scatter`, :meth:`gather`, :meth:`allgather`, :meth:`send`, :meth:`recv`.
    In-place buffer API (torch tensors or numpy arrays, no pickling, no extra copies on native
    engines): :meth:`allreduce`, :meth:`reduce`, :meth:`broadcast_into`, :meth:`gather_into`,
    :meth:`allgather_into`, :meth:`scatter_into`, :meth:`gatherv_into`, :meth:`send_buffer`,
    :meth:`recv_into`.
    Every method takes ``timeout=`` (seconds; default ``options.timeout``) and has an ``i``
    variant returning a :class:`Work`.
    """

    def __init__(self, backend: Backend, options: CommOptions | None = None) -> None:
        self._backend = backend
        # Read on every op: plain attributes cost less than the properties.
        self._rank, self._size = backend.rank, backend.size
        self._options = options or CommOptions()
        backend.codec = self._options.codec
        # Sequence number, issue lock and "may an op run inline now" live in the lane, which a
        # backend's fast path shares (see FastLane); open = usable and nothing queued.
        self._lane = FastLane(self._rank, self._options.timeout)
        self._issue_lock = self._lane.lock
        self._run_lock = threading.Lock()
        self._pending = 0
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._p2p_pool: ElasticPool | None = None
        self._failed: str | None = None
        self._closed = False
        self._fast_allreduce = backend.fast_path("allreduce", self._lane)
        self._fast_broadcast_into = backend.fast_path("broadcast_into", self._lane)

    @property
    def options(self) -> CommOptions:
        """Timeout and codec defaults (assign a new :class:`CommOptions` to change them)."""
        return self._options

    @options.setter
    def options(self, options: CommOptions) -> None:
        self._options = options
        self._backend.codec = options.codec
        self._lane.timeout = options.timeout

    # -- identity ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def engine(self) -> Backend:
        """The backend object itself (for engine-specific escapes such as the MPI communicator)."""
        return self._backend

    def peers(self) -> dict[int, str]:
        """Health of every other rank as the backend sees it: "ok", "lost" or "unknown"."""
        return self._backend.peers()

    def stats(self) -> dict[str, Any]:
        """The backend's counters (the udp backend: datagrams, drops by cause, retransmissions,
        socket buffer sizes, GSO/GRO); empty for backends that keep none."""
        return self._backend.stats()

    def paths(self) -> dict[int, dict[str, Any]]:
        """How this rank reaches each peer, where the backend chooses it: ``{rank: {"path":
        p, "address": (host, port) or None, ...}}``.  The udp backend: ``direct`` (a local
        address), ``punched`` (through a NAT) or ``relayed`` (through the rendezvous server,
        whose address is then given), plus, in ``stun`` discovery, ``switches`` and
        ``direct_after_s``; ``direct`` for every peer in its other discovery modes.  Empty for
        backends whose fabric routes (mpi, gloo, nccl, local).  :meth:`peers` says whether each
        peer is alive."""
        return self._backend.paths()

    def __repr__(self) -> str:
        return f"<Communicator backend={self.backend} rank={self.rank}/{self.size}>"

    # -- object API ----------------------------------------------------------------------------
    def broadcast(self, obj: Any = None, root: int = 0, *, timeout: float | None = None) -> Any:
        """Return root's ``obj`` on every rank (root gets its own object back, not a copy)."""
        return self.ibroadcast(obj, root, timeout=timeout, _blocking=True).wait()

    def ibroadcast(
        self,
        obj: Any = None,
        root: int = 0,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Any]:
        self._check_root(root, "broadcast")
        # Encoded before the op is numbered: an object the codec refuses is a caller error.
        mine = self._encode(obj) if self.rank == root else None

        def body(ctx: OpContext) -> Any:
            msg = self._backend.broadcast(mine, root, ctx)
            return obj if self.rank == root else self._decode(msg)

        return self._collective("broadcast", timeout, body, _blocking)

    def scatter(
        self, items: Sequence[Any] | None = None, root: int = 0, *, timeout: float | None = None
    ) -> Any:
        """Root passes ``size`` items; rank i receives ``items[i]``."""
        return self.iscatter(items, root, timeout=timeout, _blocking=True).wait()

    def iscatter(
        self,
        items: Sequence[Any] | None = None,
        root: int = 0,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Any]:
        self._check_root(root, "scatter")
        if self.rank == root:
            if items is None or isinstance(items, (str, bytes)) or len(items) != self.size:
                got = "None" if items is None else f"{type(items).__name__}"
                if items is not None and not isinstance(items, (str, bytes)):
                    got += f" of length {len(items)}"
                raise InvalidArgumentError(
                    f"scatter on root {root} needs a sequence of exactly {self.size} items "
                    f"(one per rank), got {got}"
                )
            items = list(items)
        msgs = None
        if items is not None and self.rank == root:
            msgs = _encode_each(items, self._encode)

        def body(ctx: OpContext) -> Any:
            msg = self._backend.scatter(msgs, root, ctx)
            return items[root] if items is not None and self.rank == root else self._decode(msg)

        return self._collective("scatter", timeout, body, _blocking)

    def gather(self, obj: Any, root: int = 0, *, timeout: float | None = None) -> list[Any] | None:
        """Root receives a list of every rank's ``obj`` in rank order; others receive None."""
        return self.igather(obj, root, timeout=timeout, _blocking=True).wait()

    def igather(
        self, obj: Any, root: int = 0, *, timeout: float | None = None, _blocking: bool = False
    ) -> Work[list[Any] | None]:
        self._check_root(root, "gather")
        mine = self._encode(obj)

        def body(ctx: OpContext) -> list[Any] | None:
            msgs = self._backend.gather(mine, root, ctx)
            if msgs is None:
                return None
            return [obj if r == self.rank else self._decode(m) for r, m in enumerate(msgs)]

        return self._collective("gather", timeout, body, _blocking)

    def allgather(self, obj: Any, *, timeout: float | None = None) -> list[Any]:
        """Every rank receives every rank's ``obj``, in rank order."""
        return self.iallgather(obj, timeout=timeout, _blocking=True).wait()

    def iallgather(
        self, obj: Any, *, timeout: float | None = None, _blocking: bool = False
    ) -> Work[list[Any]]:
        mine = self._encode(obj)

        def body(ctx: OpContext) -> list[Any]:
            msgs = self._backend.allgather(mine, ctx)
            return [obj if r == self.rank else self._decode(m) for r, m in enumerate(msgs)]

        return self._collective("allgather", timeout, body, _blocking)

    def barrier(self, *, timeout: float | None = None) -> None:
        self.ibarrier(timeout=timeout, _blocking=True).wait()

    def ibarrier(self, *, timeout: float | None = None, _blocking: bool = False) -> Work[None]:
        return self._collective("barrier", timeout, self._backend.barrier, _blocking)

    def send(self, obj: Any, dst: int, tag: int = 0, *, timeout: float | None = None) -> None:
        self.isend(obj, dst, tag, timeout=timeout, _blocking=True).wait()

    def isend(
        self,
        obj: Any,
        dst: int,
        tag: int = 0,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[None]:
        self._check_peer(dst, "send", "dst")
        msg = self._encode(obj)
        return self._p2p(
            "send", timeout, lambda ctx: self._backend.send(msg, dst, tag, ctx), _blocking
        )

    def recv(self, src: int, tag: int = 0, *, timeout: float | None = None) -> Any:
        return self.irecv(src, tag, timeout=timeout, _blocking=True).wait()

    def irecv(
        self, src: int, tag: int = 0, *, timeout: float | None = None, _blocking: bool = False
    ) -> Work[Any]:
        self._check_peer(src, "recv", "src")
        return self._p2p(
            "recv", timeout, lambda ctx: self._decode(self._backend.recv(src, tag, ctx)), _blocking
        )

    # -- lifetime ------------------------------------------------------------------------------
    def abort(self, reason: str = "aborted by the user") -> None:
        """Fail every pending and future op on this rank now (ComfyUI's interrupt calls this)."""
        self._fail(reason)
        self._backend.abort(reason)

    def close(self) -> None:
        """Wait for queued ops to finish, then release the backend.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._lane.open = False
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=self._options.timeout)
        if self._p2p_pool is not None:
            self._p2p_pool.shutdown()
        self._backend.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None and not self._closed:
            self.abort(f"context exited with {getattr(exc_info[0], '__name__', exc_info[0])}")
        self.close()

    # -- machinery -----------------------------------------------------------------------------
    def _encode(self, obj: Any) -> Encoded:
        return encode(obj, self._options.codec)

    def _decode(self, msg: Encoded) -> Any:
        # The header as the receiving transport already checked it, when it did (not parsed twice).
        header = msg.header if msg.checked is None else msg.checked
        return decode(header, msg.buffers, self._options.codec)

    def _check_usable(self, op: str) -> None:
        # The failure first: an aborted communicator is usually closed soon after, and the
        # reason (e.g. "interrupted on rank 1") is what the caller needs to see.
        if self._failed is not None:
            raise CommunicatorAbortedError(
                f"{op} on rank {self.rank}: the communicator is unusable after an earlier "
                f"failure ({self._failed}); create a new one"
            )
        if self._closed:
            raise CommunicatorAbortedError(f"{op} on rank {self.rank}: the communicator is closed")

    def _check_root(self, root: int, op: str) -> None:
        if not isinstance(root, int) or not 0 <= root < self._size:
            raise InvalidArgumentError(f"{op}: root={root!r} is not a rank in 0..{self.size - 1}")

    def _check_peer(self, peer: int, op: str, name: str) -> None:
        if not isinstance(peer, int) or not 0 <= peer < self._size:
            raise InvalidArgumentError(f"{op}: {name}={peer!r} is not a rank in 0..{self.size - 1}")
        if peer == self.rank:
            raise InvalidArgumentError(f"{op}: {name}={peer} is this rank; use a local copy")

    def _deadline(self, name: str, timeout: float | None) -> Deadline:
        """The op's deadline; the last argument check (of ``timeout``) before it is numbered."""
        # The default was validated when the options were made.
        timeout = self._options.timeout if timeout is None else check_timeout(timeout)
        # Built directly: calling the class runs its Python __new__ (see _now).
        return _tuple_new(Deadline, (_monotonic() + timeout, timeout, name, self._rank))

    def _collective(
        self, name: str, timeout: float | None, body: Callable[[OpContext], T], blocking: bool
    ) -> Work[T]:
        """Number and run (or queue) a collective whose arguments the caller has checked."""
        if self._closed or self._failed is not None:
            self._check_usable(name)
        deadline = self._deadline(name, timeout)
        with self._issue_lock:
            # Every check has passed: only now may the op take a sequence number (FastLane.take).
            ctx = _tuple_new(OpContext, (name, self._lane.take(), deadline))
            work: Work[T] = Work(name, self._rank)
            if blocking and not self._pending:
                # Nothing queued ahead of us: run on the caller's thread (no hop, no latency).
                # The issue lock is held, so no queued op can start meanwhile.
                try:
                    work.resolve_unshared(body(ctx))
                except BaseException as err:
                    self._failure(work, err)
                return work
            self._pending += 1
            self._lane.open = False
            self._ensure_worker()
        body = _in_callers_mode(body)
        self._queue.put(lambda: self._execute_queued(work, ctx, body))
        return work

    def _now(
        self, name: str, timeout: float | None, run: Callable[..., object], *args: Any
    ) -> None:
        """Run ``run(*args, ctx)`` as a blocking collective on the caller's thread.

        The blocking path of the in-place API: no :class:`Work`, no closure.  Each costs little
        on its own, but the op after a 1 MiB transfer runs with caches full of that data, where
        every Python frame and object before the engine's call was measured at several µs (the
        whole wrapper ran ~10x its warm cost).  With async ops queued, it waits its turn.
        """
        if self._closed or self._failed is not None:
            self._check_usable(name)
        deadline = self._deadline(name, timeout)
        with self._issue_lock:
            if not self._pending:
                ctx = _tuple_new(OpContext, (name, self._lane.take(), deadline))
                try:
                    # Fixed arities are plain calls, which Python runs without a C round trip
                    # (run(*args) is not): worth it on the path every in-place op takes.
                    if len(args) == 2:
                        run(args[0], args[1], ctx)
                    elif len(args) == 3:
                        run(args[0], args[1], args[2], ctx)
                    else:
                        run(*args, ctx)
                except BaseException as err:
                    self._fatal(err)
                    raise
                return
        self._later(name, timeout, run, args, None).wait()

    def _later(
        self,
        name: str,
        timeout: float | None,
        run: Callable[..., object],
        args: tuple[Any, ...],
        result: T,
    ) -> Work[T]:
        """Queue ``run(*args, ctx)`` as an async collective whose Work resolves to ``result``."""

        def body(ctx: OpContext) -> T:
            run(*args, ctx)
            return result

        return self._collective(name, timeout, body, False)

    def _execute_queued(
        self, work: Work[T], ctx: OpContext, body: Callable[[OpContext], T]
    ) -> None:
        try:
            with self._run_lock:
                self._execute(work, ctx, body)
        finally:
            with self._issue_lock:
                self._pending -= 1
                self._lane.open = not (self._pending or self._closed) and self._failed is None

    def _execute(self, work: Work[T], ctx: OpContext, body: Callable[[OpContext], T]) -> None:
        try:
            self._check_usable(ctx.name)
            work.set_result(body(ctx))
        except BaseException as err:
            self._failure(work, err)

    def _failure(self, work: Work[T], err: BaseException) -> None:
        """Hand ``err`` to the waiter (who re-raises it); a fatal one poisons the communicator."""
        self._fatal(err)
        work.set_exception(err)

    def _fatal(self, err: BaseException) -> None:
        """After a fatal ``err`` (see _FATAL) the communicator refuses every later op."""
        if isinstance(err, _FATAL):
            self._fail(f"{type(err).__name__}: {err}")

    def _fail(self, reason: str) -> None:
        self._failed = self._failed or reason
        self._lane.open = False

    def _p2p(
        self, name: str, timeout: float | None, body: Callable[[OpContext], T], blocking: bool
    ) -> Work[T]:
        # Point-to-point ops are not ordered against collectives (their channels are separate),
        # so they never wait behind one.  Async ones each run on a thread of an elastic pool
        # (never a fixed number: an irecv must not hold the thread the isend that would satisfy
        # the peer needs), and carry sequence number 0.
        self._check_usable(name)
        ctx = OpContext(name, 0, self._deadline(name, timeout))
        work: Work[T] = Work(name, self.rank)
        if blocking:
            self._execute_p2p(work, ctx, body)
            return work
        with self._issue_lock:
            if self._p2p_pool is None:
                self._p2p_pool = ElasticPool(f"cc-p2p-r{self.rank}")
            pool = self._p2p_pool
        run = _in_callers_mode(body)
        pool.submit(lambda: self._execute_p2p(work, ctx, run))
        return work

    def _execute_p2p(self, work: Work[T], ctx: OpContext, body: Callable[[OpContext], T]) -> None:
        try:
            self._check_usable(ctx.name)
            work.set_result(body(ctx))
        except BaseException as err:
            work.set_exception(err)

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._work_loop, name=f"cc-collectives-r{self.rank}", daemon=True
            )
            self._worker.start()

    def _work_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job()


def _encode_each(items: Sequence[Any], encode: Callable[[Any], Encoded]) -> list[Encoded]:
    """Encode every item once per distinct object: scattering one value to every rank (a
    broadcast without a relay tree) pickles it once, not once per rank."""
    seen: dict[int, Encoded] = {}
    out = []
    for item in items:
        msg = seen.get(id(item))
        if msg is None:
            msg = seen[id(item)] = encode(item)
        out.append(msg)
    return out


def _in_callers_mode(body: Callable[[OpContext], T]) -> Callable[[OpContext], T]:
    """``body`` as it must run on another thread for a caller in ``torch.inference_mode()``.

    The mode is per thread, and tensors made under it (ComfyUI runs every node so) may only be
    written in place under it: without this, an async op could not fill the caller's buffers.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_inference_mode_enabled():
        return body

    def in_inference_mode(ctx: OpContext) -> T:
        with torch.inference_mode():
            return body(ctx)

    return in_inference_mode
