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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from collectives.backends.base import Backend, OpContext
from collectives.codec import Encoded, decode, encode
from collectives.deadline import Deadline
from collectives.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CommunicatorAbortedError,
    ConnectionLostError,
    InvalidArgumentError,
)
from collectives.options import CommOptions
from collectives.reduce_op import ReduceOp, check_reducible
from collectives.work import Work

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
Buffer = Any  # torch.Tensor or numpy.ndarray; kept loose so numpy-first callers type-check

# ``torch.Tensor`` once torch is imported (by whoever passes the first tensor); the module itself
# does not import torch, so that importing collectives stays light.
_TENSOR_TYPE: Any = None

# Failures after which messages of the failed op may still be in flight: the communicator can no
# longer tell them from the next op's, so it refuses further ops (as NCCL does after an error).
_FATAL = (CollectiveTimeoutError, CollectiveMismatchError, ConnectionLostError)


class Communicator:
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
        self.options = options or CommOptions()
        self._seq = 0
        self._issue_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._pending = 0
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._p2p_pool: ThreadPoolExecutor | None = None
        self._failed: str | None = None
        self._closed = False

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

        def body(ctx: OpContext) -> Any:
            msg = self._backend.broadcast(
                self._encode(obj) if self.rank == root else None, root, ctx
            )
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

        def body(ctx: OpContext) -> Any:
            msgs = None
            if items is not None and self.rank == root:
                msgs = _encode_each(items, self._encode)
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

        def body(ctx: OpContext) -> list[Any] | None:
            msgs = self._backend.gather(self._encode(obj), root, ctx)
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
        def body(ctx: OpContext) -> list[Any]:
            msgs = self._backend.allgather(self._encode(obj), ctx)
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
        return self._p2p(
            "send",
            timeout,
            lambda ctx: self._backend.send(self._encode(obj), dst, tag, ctx),
            _blocking,
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

    # -- in-place buffer API -------------------------------------------------------------------
    def allreduce(
        self, tensor: Buffer, op: ReduceOp | str = "sum", *, timeout: float | None = None
    ) -> Buffer:
        """Reduce ``tensor`` over all ranks, in place; every rank ends with the same values."""
        return self.iallreduce(tensor, op, timeout=timeout, _blocking=True).wait()

    def iallreduce(
        self,
        tensor: Buffer,
        op: ReduceOp | str = "sum",
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Buffer]:
        t, rop = _as_tensor(tensor, "allreduce"), ReduceOp.parse(op)
        check_reducible(t, rop)

        def body(ctx: OpContext) -> Buffer:
            self._backend.allreduce(t, rop, ctx)
            return tensor

        return self._collective("allreduce", timeout, body, _blocking)

    def reduce(
        self,
        tensor: Buffer,
        root: int = 0,
        op: ReduceOp | str = "sum",
        *,
        timeout: float | None = None,
    ) -> Buffer | None:
        """Reduce into ``tensor`` on root (returned there); other ranks get None.

        As in torch.distributed, other ranks' tensors may be used as scratch space by native
        engines: do not rely on their contents afterwards.
        """
        return self.ireduce(tensor, root, op, timeout=timeout, _blocking=True).wait()

    def ireduce(
        self,
        tensor: Buffer,
        root: int = 0,
        op: ReduceOp | str = "sum",
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Buffer | None]:
        self._check_root(root, "reduce")
        t, rop = _as_tensor(tensor, "reduce"), ReduceOp.parse(op)
        check_reducible(t, rop)

        def body(ctx: OpContext) -> Buffer | None:
            self._backend.reduce(t, root, rop, ctx)
            return tensor if self.rank == root else None

        return self._collective("reduce", timeout, body, _blocking)

    def broadcast_into(self, buf: Buffer, root: int = 0, *, timeout: float | None = None) -> Buffer:
        """Overwrite ``buf`` on every rank with root's ``buf`` (same shape and dtype everywhere)."""
        return self.ibroadcast_into(buf, root, timeout=timeout, _blocking=True).wait()

    def ibroadcast_into(
        self, buf: Buffer, root: int = 0, *, timeout: float | None = None, _blocking: bool = False
    ) -> Work[Buffer]:
        self._check_root(root, "broadcast_into")
        t = _as_tensor(buf, "broadcast_into")

        def body(ctx: OpContext) -> Buffer:
            self._backend.broadcast_into(t, root, ctx)
            return buf

        return self._collective("broadcast_into", timeout, body, _blocking)

    def gather_into(
        self,
        recvbuf: Buffer | None,
        sendbuf: Buffer,
        root: int = 0,
        *,
        timeout: float | None = None,
    ) -> Buffer | None:
        """Root's ``recvbuf`` (``size`` blocks shaped like ``sendbuf``) receives every block."""
        return self.igather_into(recvbuf, sendbuf, root, timeout=timeout, _blocking=True).wait()

    def igather_into(
        self,
        recvbuf: Buffer | None,
        sendbuf: Buffer,
        root: int = 0,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Buffer | None]:
        self._check_root(root, "gather_into")
        src = _as_tensor(sendbuf, "gather_into")
        out = None
        if self.rank == root:
            out = _as_tensor(recvbuf, "gather_into", "recvbuf")
            _check_blocks(out, src, self.size, "gather_into")

        def body(ctx: OpContext) -> Buffer | None:
            self._backend.gather_into(out, src, root, ctx)
            return recvbuf if self.rank == root else None

        return self._collective("gather_into", timeout, body, _blocking)

    def gatherv_into(
        self,
        recvbufs: Sequence[Buffer] | None,
        sendbuf: Buffer,
        root: int = 0,
        *,
        timeout: float | None = None,
    ) -> Sequence[Buffer] | None:
        """Root's ``recvbufs[r]`` receives rank ``r``'s ``sendbuf``; sizes may differ by rank.

        MPI's ``Gatherv``: each rank sends what it has, and the root provides one contiguous
        buffer per rank with that rank's dtype and element count (typically views into one
        output, such as slices of a batch, so nothing is concatenated afterwards).  Other ranks
        pass None.  A buffer that does not match what its rank sends raises
        :class:`CollectiveMismatchError` on the root.  Returns ``recvbufs`` on the root.
        """
        return self.igatherv_into(recvbufs, sendbuf, root, timeout=timeout, _blocking=True).wait()

    def igatherv_into(
        self,
        recvbufs: Sequence[Buffer] | None,
        sendbuf: Buffer,
        root: int = 0,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Sequence[Buffer] | None]:
        self._check_root(root, "gatherv_into")
        src = _as_tensor(sendbuf, "gatherv_into")
        blocks = None
        if self._rank == root:
            if recvbufs is None or isinstance(recvbufs, (str, bytes)) or len(recvbufs) != self.size:
                raise InvalidArgumentError(
                    f"gatherv_into on root {root} needs a sequence of exactly {self.size} "
                    "buffers (one per rank, in rank order)"
                )
            blocks = [
                _as_tensor(b, "gatherv_into", f"recvbufs[{r}]") for r, b in enumerate(recvbufs)
            ]
            own = blocks[root]
            if own.dtype != src.dtype or own.numel() != src.numel():
                raise InvalidArgumentError(
                    f"gatherv_into: recvbufs[{root}] (the root's own block) is {own.dtype} with "
                    f"{own.numel()} elements but sendbuf is {src.dtype} with {src.numel()}"
                )

        def body(ctx: OpContext) -> Sequence[Buffer] | None:
            self._backend.gatherv_into(blocks, src, root, ctx)
            return recvbufs if self._rank == root else None

        return self._collective("gatherv_into", timeout, body, _blocking)

    def allgather_into(
        self, recvbuf: Buffer, sendbuf: Buffer, *, timeout: float | None = None
    ) -> Buffer:
        """Every rank's ``recvbuf`` (``size`` blocks shaped like ``sendbuf``) gets every block."""
        return self.iallgather_into(recvbuf, sendbuf, timeout=timeout, _blocking=True).wait()

    def iallgather_into(
        self,
        recvbuf: Buffer,
        sendbuf: Buffer,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Buffer]:
        src = _as_tensor(sendbuf, "allgather_into")
        out = _as_tensor(recvbuf, "allgather_into", "recvbuf")
        _check_blocks(out, src, self.size, "allgather_into")

        def body(ctx: OpContext) -> Buffer:
            self._backend.allgather_into(out, src, ctx)
            return recvbuf

        return self._collective("allgather_into", timeout, body, _blocking)

    def scatter_into(
        self,
        recvbuf: Buffer,
        sendbuf: Buffer | None = None,
        root: int = 0,
        *,
        timeout: float | None = None,
    ) -> Buffer:
        """Rank i's ``recvbuf`` receives block i of root's ``sendbuf`` (``size`` blocks)."""
        return self.iscatter_into(recvbuf, sendbuf, root, timeout=timeout, _blocking=True).wait()

    def iscatter_into(
        self,
        recvbuf: Buffer,
        sendbuf: Buffer | None = None,
        root: int = 0,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Buffer]:
        self._check_root(root, "scatter_into")
        out = _as_tensor(recvbuf, "scatter_into", "recvbuf")
        src = None
        if self.rank == root:
            src = _as_tensor(sendbuf, "scatter_into", "sendbuf")
            _check_blocks(src, out, self.size, "scatter_into")

        def body(ctx: OpContext) -> Buffer:
            self._backend.scatter_into(out, src, root, ctx)
            return recvbuf

        return self._collective("scatter_into", timeout, body, _blocking)

    def send_buffer(
        self, buf: Buffer, dst: int, tag: int = 0, *, timeout: float | None = None
    ) -> None:
        """Send a tensor's bytes; the receiver passes a buffer of the same shape and dtype."""
        self.isend_buffer(buf, dst, tag, timeout=timeout, _blocking=True).wait()

    def isend_buffer(
        self,
        buf: Buffer,
        dst: int,
        tag: int = 0,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[None]:
        self._check_peer(dst, "send_buffer", "dst")
        t = _as_tensor(buf, "send_buffer")
        return self._p2p(
            "send_buffer",
            timeout,
            lambda ctx: self._backend.send_buffer(t, dst, tag, ctx),
            _blocking,
        )

    def recv_into(
        self, buf: Buffer, src: int, tag: int = 0, *, timeout: float | None = None
    ) -> Buffer:
        return self.irecv_into(buf, src, tag, timeout=timeout, _blocking=True).wait()

    def irecv_into(
        self,
        buf: Buffer,
        src: int,
        tag: int = 0,
        *,
        timeout: float | None = None,
        _blocking: bool = False,
    ) -> Work[Buffer]:
        self._check_peer(src, "recv_into", "src")
        t = _as_tensor(buf, "recv_into")

        def body(ctx: OpContext) -> Buffer:
            self._backend.recv_into(t, src, tag, ctx)
            return buf

        return self._p2p("recv_into", timeout, body, _blocking)

    # -- lifetime ------------------------------------------------------------------------------
    def abort(self, reason: str = "aborted by the user") -> None:
        """Fail every pending and future op on this rank now (ComfyUI's interrupt calls this)."""
        self._failed = self._failed or reason
        self._backend.abort(reason)

    def close(self) -> None:
        """Wait for queued ops to finish, then release the backend.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=self.options.timeout)
        if self._p2p_pool is not None:
            self._p2p_pool.shutdown(wait=False, cancel_futures=True)
        self._backend.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None and not self._closed:
            self.abort(f"context exited with {getattr(exc_info[0], '__name__', exc_info[0])}")
        self.close()

    # -- machinery -----------------------------------------------------------------------------
    def _encode(self, obj: Any) -> Encoded:
        return encode(obj, self.options.codec)

    def _decode(self, msg: Encoded) -> Any:
        return decode(msg.header, msg.buffers, self.options.codec)

    def _check_usable(self, op: str) -> None:
        if self._closed:
            raise CommunicatorAbortedError(f"{op} on rank {self.rank}: the communicator is closed")
        if self._failed is not None:
            raise CommunicatorAbortedError(
                f"{op} on rank {self.rank}: the communicator is unusable after an earlier "
                f"failure ({self._failed}); create a new one"
            )

    def _check_root(self, root: int, op: str) -> None:
        if not isinstance(root, int) or not 0 <= root < self._size:
            raise InvalidArgumentError(f"{op}: root={root!r} is not a rank in 0..{self.size - 1}")

    def _check_peer(self, peer: int, op: str, name: str) -> None:
        if not isinstance(peer, int) or not 0 <= peer < self._size:
            raise InvalidArgumentError(f"{op}: {name}={peer!r} is not a rank in 0..{self.size - 1}")
        if peer == self.rank:
            raise InvalidArgumentError(f"{op}: {name}={peer} is this rank; use a local copy")

    def _context(self, name: str, timeout: float | None, seq: int) -> OpContext:
        if timeout is None:
            return OpContext(
                name, seq, Deadline(self.options.timeout, name, self._rank, checked=True)
            )
        return OpContext(name, seq, Deadline(timeout, name, self._rank))

    def _collective(
        self, name: str, timeout: float | None, body: Callable[[OpContext], T], blocking: bool
    ) -> Work[T]:
        if self._closed or self._failed is not None:
            self._check_usable(name)
        with self._issue_lock:
            seq = self._seq
            self._seq = seq + 1
            ctx = self._context(name, timeout, seq)
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
            self._ensure_worker()
        body = _in_callers_mode(body)
        self._queue.put(lambda: self._execute_queued(work, ctx, body))
        return work

    def _execute_queued(
        self, work: Work[T], ctx: OpContext, body: Callable[[OpContext], T]
    ) -> None:
        try:
            with self._run_lock:
                self._execute(work, ctx, body)
        finally:
            with self._issue_lock:
                self._pending -= 1

    def _execute(self, work: Work[T], ctx: OpContext, body: Callable[[OpContext], T]) -> None:
        try:
            self._check_usable(ctx.name)
            work.set_result(body(ctx))
        except BaseException as err:
            self._failure(work, err)

    def _failure(self, work: Work[T], err: BaseException) -> None:
        """Hand ``err`` to the waiter (who re-raises it); a fatal one poisons the communicator."""
        if isinstance(err, _FATAL):
            self._failed = self._failed or f"{type(err).__name__}: {err}"
        work.set_exception(err)

    def _p2p(
        self, name: str, timeout: float | None, body: Callable[[OpContext], T], blocking: bool
    ) -> Work[T]:
        # Point-to-point ops are not ordered against collectives (their channels are separate),
        # so they never wait behind one; async ones each get a pool thread so that an irecv
        # cannot block the isend that would satisfy the peer.
        self._check_usable(name)
        ctx = self._context(name, timeout, 0)
        work: Work[T] = Work(name, self.rank)
        if blocking:
            self._execute_p2p(work, ctx, body)
            return work
        with self._issue_lock:
            if self._p2p_pool is None:
                self._p2p_pool = ThreadPoolExecutor(32, thread_name_prefix=f"cc-p2p-r{self.rank}")
        self._p2p_pool.submit(self._execute_p2p, work, ctx, _in_callers_mode(body))
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


def _as_tensor(buf: Buffer, op: str, name: str = "tensor") -> torch.Tensor:
    """View a torch tensor or numpy array as a contiguous tensor sharing its memory."""
    global _TENSOR_TYPE
    if type(buf) is _TENSOR_TYPE and buf.is_contiguous():  # the common case, first and cheap
        return buf  # type: ignore[no-any-return]
    import numpy as np
    import torch

    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous or not buf.flags.writeable:
            raise InvalidArgumentError(
                f"{op}: {name} must be a C-contiguous, writable array (use numpy.ascontiguousarray)"
            )
        return torch.from_numpy(buf)
    if not isinstance(buf, torch.Tensor):
        raise InvalidArgumentError(
            f"{op}: {name} must be a torch.Tensor or numpy.ndarray, got {type(buf).__name__} "
            "(use broadcast/gather/... for arbitrary objects)"
        )
    if not buf.is_contiguous():
        raise InvalidArgumentError(f"{op}: {name} must be contiguous (call .contiguous() first)")
    _TENSOR_TYPE = torch.Tensor
    return buf


def _check_blocks(big: torch.Tensor, block: torch.Tensor, size: int, op: str) -> None:
    if big.dtype != block.dtype or big.numel() != size * block.numel():
        raise InvalidArgumentError(
            f"{op}: the {size}-block buffer is {big.dtype} with {big.numel()} elements; it must be "
            f"{block.dtype} with {size} x {block.numel()} elements"
        )
