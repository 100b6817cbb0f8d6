"""The in-place buffer API of :class:`~collectives.communicator.Communicator` (a mixin).

Torch tensors or numpy arrays, viewed as contiguous tensors over the caller's own memory: no
pickling, and on native engines no copies.  Each method checks its arguments here, once, then
runs the backend's method in the communicator's order: blocking ones inline (``_now``), the
``i`` variants queued behind a :class:`Work` (``_later``); point to point on its own (``_p2p``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from collectives.errors import InvalidArgumentError
from collectives.reduce_op import PARSED, ReduceOp, check_reducible

if TYPE_CHECKING:
    import torch

    from collectives.backends.base import Backend, FastOp, OpContext
    from collectives.work import Work

T = TypeVar("T")
Buffer = Any  # torch.Tensor or numpy.ndarray; kept loose so numpy-first callers type-check

# ``torch.Tensor`` once torch is imported (by whoever passes the first tensor); the module itself
# does not import torch, so that importing collectives stays light.
_TENSOR_TYPE: Any = None
_SUM = ReduceOp.SUM


class BufferOps:
    """:meth:`allreduce`, :meth:`reduce`, :meth:`broadcast_into`, :meth:`gather_into`,
    :meth:`gatherv_into`, :meth:`allgather_into`, :meth:`scatter_into`, :meth:`send_buffer`,
    :meth:`recv_into`, each with its ``i`` variant returning a :class:`Work`."""

    if TYPE_CHECKING:  # provided by Communicator
        _backend: Backend
        _rank: int
        _size: int
        _fast_allreduce: FastOp | None
        _fast_broadcast_into: FastOp | None

        @property
        def rank(self) -> int: ...

        @property
        def size(self) -> int: ...

        def _check_root(self, root: int, op: str) -> None: ...

        def _fatal(self, err: BaseException) -> None: ...

        def _check_peer(self, peer: int, op: str, name: str) -> None: ...

        def _p2p(
            self, name: str, timeout: float | None, body: Callable[[OpContext], T], blocking: bool
        ) -> Work[T]: ...

        def _now(
            self, name: str, timeout: float | None, run: Callable[..., object], *args: Any
        ) -> None: ...

        def _later(
            self,
            name: str,
            timeout: float | None,
            run: Callable[..., object],
            args: tuple[Any, ...],
            result: T,
        ) -> Work[T]: ...

    # Each op checks its arguments once (``_*_args``), then runs now (blocking: ``_now``, no
    # Work handle) or queued (``_later``).
    def allreduce(
        self, tensor: Buffer, op: ReduceOp | str = "sum", *, timeout: float | None = None
    ) -> Buffer:
        """Reduce ``tensor`` over all ranks, in place; every rank ends with the same values."""
        fast = self._fast_allreduce
        if fast is not None:
            try:
                if fast(tensor, op, timeout):
                    return tensor
            except BaseException as err:
                self._fatal(err)
                raise
        t, rop = _reducible(tensor, op, "allreduce")
        self._now("allreduce", timeout, self._backend.allreduce, t, rop)
        return tensor

    def iallreduce(
        self, tensor: Buffer, op: ReduceOp | str = "sum", *, timeout: float | None = None
    ) -> Work[Buffer]:
        t, rop = _reducible(tensor, op, "allreduce")
        return self._later("allreduce", timeout, self._backend.allreduce, (t, rop), tensor)

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
        self._check_root(root, "reduce")
        t, rop = _reducible(tensor, op, "reduce")
        self._now("reduce", timeout, self._backend.reduce, t, root, rop)
        return tensor if self._rank == root else None

    def ireduce(
        self,
        tensor: Buffer,
        root: int = 0,
        op: ReduceOp | str = "sum",
        *,
        timeout: float | None = None,
    ) -> Work[Buffer | None]:
        self._check_root(root, "reduce")
        t, rop = _reducible(tensor, op, "reduce")
        result = tensor if self._rank == root else None
        return self._later("reduce", timeout, self._backend.reduce, (t, root, rop), result)

    def broadcast_into(self, buf: Buffer, root: int = 0, *, timeout: float | None = None) -> Buffer:
        """Overwrite ``buf`` on every rank with root's ``buf`` (same shape and dtype everywhere)."""
        fast = self._fast_broadcast_into
        if fast is not None:
            try:
                if fast(buf, root, timeout):
                    return buf
            except BaseException as err:
                self._fatal(err)
                raise
        self._check_root(root, "broadcast_into")
        t = _as_tensor(buf, "broadcast_into")
        self._now("broadcast_into", timeout, self._backend.broadcast_into, t, root)
        return buf

    def ibroadcast_into(
        self, buf: Buffer, root: int = 0, *, timeout: float | None = None
    ) -> Work[Buffer]:
        self._check_root(root, "broadcast_into")
        t = _as_tensor(buf, "broadcast_into")
        return self._later("broadcast_into", timeout, self._backend.broadcast_into, (t, root), buf)

    def gather_into(
        self,
        recvbuf: Buffer | None,
        sendbuf: Buffer,
        root: int = 0,
        *,
        timeout: float | None = None,
    ) -> Buffer | None:
        """Root's ``recvbuf`` (``size`` blocks shaped like ``sendbuf``) receives every block."""
        out, src = self._gather_args(recvbuf, sendbuf, root)
        self._now("gather_into", timeout, self._backend.gather_into, out, src, root)
        return recvbuf if self._rank == root else None

    def igather_into(
        self,
        recvbuf: Buffer | None,
        sendbuf: Buffer,
        root: int = 0,
        *,
        timeout: float | None = None,
    ) -> Work[Buffer | None]:
        out, src = self._gather_args(recvbuf, sendbuf, root)
        result = recvbuf if self._rank == root else None
        run = self._backend.gather_into
        return self._later("gather_into", timeout, run, (out, src, root), result)

    def _gather_args(
        self, recvbuf: Buffer | None, sendbuf: Buffer, root: int
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        self._check_root(root, "gather_into")
        src = _as_tensor(sendbuf, "gather_into")
        out = None
        if self._rank == root:
            out = _as_tensor(recvbuf, "gather_into", "recvbuf")
            _check_blocks(out, src, self._size, "gather_into")
        return out, src

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
        blocks, src = self._gatherv_args(recvbufs, sendbuf, root)
        self._now("gatherv_into", timeout, self._backend.gatherv_into, blocks, src, root)
        return recvbufs if self._rank == root else None

    def igatherv_into(
        self,
        recvbufs: Sequence[Buffer] | None,
        sendbuf: Buffer,
        root: int = 0,
        *,
        timeout: float | None = None,
    ) -> Work[Sequence[Buffer] | None]:
        blocks, src = self._gatherv_args(recvbufs, sendbuf, root)
        result = recvbufs if self._rank == root else None
        run = self._backend.gatherv_into
        return self._later("gatherv_into", timeout, run, (blocks, src, root), result)

    def _gatherv_args(
        self, recvbufs: Sequence[Buffer] | None, sendbuf: Buffer, root: int
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        self._check_root(root, "gatherv_into")
        src = _as_tensor(sendbuf, "gatherv_into")
        if self._rank != root:
            return None, src
        if recvbufs is None or isinstance(recvbufs, (str, bytes)) or len(recvbufs) != self._size:
            raise InvalidArgumentError(
                f"gatherv_into on root {root} needs a sequence of exactly {self._size} "
                "buffers (one per rank, in rank order)"
            )
        blocks = [_as_tensor(b, "gatherv_into", f"recvbufs[{r}]") for r, b in enumerate(recvbufs)]
        own = blocks[root]
        if own.dtype != src.dtype or own.numel() != src.numel():
            raise InvalidArgumentError(
                f"gatherv_into: recvbufs[{root}] (the root's own block) is {own.dtype} with "
                f"{own.numel()} elements but sendbuf is {src.dtype} with {src.numel()}"
            )
        return blocks, src

    def allgather_into(
        self, recvbuf: Buffer, sendbuf: Buffer, *, timeout: float | None = None
    ) -> Buffer:
        """Every rank's ``recvbuf`` (``size`` blocks shaped like ``sendbuf``) gets every block."""
        out, src = self._allgather_args(recvbuf, sendbuf)
        self._now("allgather_into", timeout, self._backend.allgather_into, out, src)
        return recvbuf

    def iallgather_into(
        self, recvbuf: Buffer, sendbuf: Buffer, *, timeout: float | None = None
    ) -> Work[Buffer]:
        out, src = self._allgather_args(recvbuf, sendbuf)
        run = self._backend.allgather_into
        return self._later("allgather_into", timeout, run, (out, src), recvbuf)

    def _allgather_args(
        self, recvbuf: Buffer, sendbuf: Buffer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = _as_tensor(sendbuf, "allgather_into")
        out = _as_tensor(recvbuf, "allgather_into", "recvbuf")
        _check_blocks(out, src, self._size, "allgather_into")
        return out, src

    def scatter_into(
        self,
        recvbuf: Buffer,
        sendbuf: Buffer | None = None,
        root: int = 0,
        *,
        timeout: float | None = None,
    ) -> Buffer:
        """Rank i's ``recvbuf`` receives block i of root's ``sendbuf`` (``size`` blocks)."""
        out, src = self._scatter_args(recvbuf, sendbuf, root)
        self._now("scatter_into", timeout, self._backend.scatter_into, out, src, root)
        return recvbuf

    def iscatter_into(
        self,
        recvbuf: Buffer,
        sendbuf: Buffer | None = None,
        root: int = 0,
        *,
        timeout: float | None = None,
    ) -> Work[Buffer]:
        out, src = self._scatter_args(recvbuf, sendbuf, root)
        run = self._backend.scatter_into
        return self._later("scatter_into", timeout, run, (out, src, root), recvbuf)

    def _scatter_args(
        self, recvbuf: Buffer, sendbuf: Buffer | None, root: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_root(root, "scatter_into")
        out = _as_tensor(recvbuf, "scatter_into", "recvbuf")
        src = None
        if self._rank == root:
            src = _as_tensor(sendbuf, "scatter_into", "sendbuf")
            _check_blocks(src, out, self._size, "scatter_into")
        return out, src

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


def _reducible(tensor: Buffer, op: ReduceOp | str, name: str) -> tuple[torch.Tensor, ReduceOp]:
    """The tensor and op of a reduction, checked (the common case in one frame: see ``_now``)."""
    if type(tensor) is _TENSOR_TYPE and tensor.is_contiguous():
        t = tensor
    else:
        t = _as_tensor(tensor, name)
    try:
        rop = PARSED[op]
    except (KeyError, TypeError):
        rop = ReduceOp.parse(op)
    if rop is not _SUM:
        check_reducible(t, rop)
    return t, rop


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
