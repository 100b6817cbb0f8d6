"""The ``gloo`` and ``nccl`` backends: thin wrappers over torch.distributed.

The in-place tensor API maps one call onto one native op of the process group, on the tensor
itself or, for dtypes gloo does not know (float8, int16, uint16+, complex), a uint8 view of the
same memory (no copy, no pickling; see :mod:`collectives.backends.torch_tensors`):
``broadcast_into`` -> broadcast, ``allreduce``
-> allreduce, ``reduce`` -> reduce, ``scatter_into`` -> scatter, ``allgather_into`` ->
all_gather_single and ``gather_into`` -> gather for small blocks.  Large gather/allgather blocks go
point to point straight into views of ``out`` instead, because gloo's own gather and allgather
move 2-3x slower than its sends on this kind of machine.  Reductions use gloo's typed ops where
gloo has the dtype (bool reduces as uint8 with or/and as max/min, complex sums as its real view)
and the shared binomial algorithms of :mod:`collectives.algorithms` for the others (float8,
int16, uint16/32/64, complex products), which give bit-identical results on every rank.

Ops are issued asynchronously on the process group with gloo's own per-op timer set just past
the op's deadline, and waited for in :mod:`collectives.backends.torch_engine` (deadline, abort,
error mapping).  The object API and user point-to-point messages are in
:mod:`collectives.backends.torch_objects` (framing in :mod:`collectives.backends.torch_messages`);
rendezvous in
:mod:`collectives.backends.torch_rendezvous`.  Design notes and limits: docs/backend-torch.md.

Importing this module imports neither torch nor torch.distributed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from collectives import algorithms
from collectives.backends import cma
from collectives.backends import torch_messages as messages
from collectives.backends import torch_objects as objects
from collectives.backends import torch_tensors as tt
from collectives.backends.base import (
    Backend,
    BackendConfig,
    OpContext,
    close_at_exit,
    land_gathered,
    register_backend,
)
from collectives.backends.envelope import NO_ROOT, comm_id
from collectives.backends.p2p import received_block
from collectives.backends.torch_engine import (
    GRACE_S,
    OBJECT_SPACE,
    Engine,
    op_tag,
    user_tag,
)
from collectives.backends.torch_rendezvous import Joined, join
from collectives.codec import encode
from collectives.errors import CommunicatorAbortedError
from collectives.reduce_op import ReduceOp, finish_

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

    from collectives.codec import Encoded

INSTALL_HINT = "pip install torch (CPU-only: --index-url https://download.pytorch.org/whl/cpu)"
# Blocks at least this big are gathered point to point rather than with gloo's gather/allgather.
P2P_GATHER_MIN_BYTES = 256 << 10
_OPTIONS_CACHED = 64  # gloo option objects kept for reuse (one per op kind, root and timeout)
_AVG = ReduceOp.AVG


class TorchBackend(Backend):
    """One rank of a torch.distributed world, over gloo (CPU tensors)."""

    name: ClassVar[str] = "gloo"
    torch_backend: ClassVar[str] = "gloo"
    uses_cuda: ClassVar[bool] = False

    def __init__(self, joined: Joined) -> None:
        super().__init__(joined.rank, joined.size)
        self._owns_default = joined.owns_default
        self._own_group = joined.own_group
        self._group: ProcessGroup | None = joined.pg
        self._store = joined.store  # rank 0's store, for the group: closed with it
        self._engine = Engine(
            joined.pg,
            joined.rank,
            joined.size,
            engine_name=self.name,
            poll=self.uses_cuda,
            hosts=joined.hosts,
        )
        self._closed = False
        # The last native op's temporary views.  Kept until the next op so that gloo's worker
        # thread, which releases an op's tensors just after completing it, is never the last
        # owner of their Python objects: it would take the GIL to free them (measured ~0.1 ms
        # added to every op whose views died first).
        self._hold: object = None
        self._direct = tt.DirectReductions()
        self._movable = tt.movable_dtypes()
        self._opts: dict[tuple[Any, ...], Any] = {}  # see _options
        # A process that exits without close() would destroy the group during interpreter
        # finalisation, where a gloo worker thread freeing a tensor aborts the process
        # ("terminate called without an active exception"): close it before that instead.
        self._at_exit = close_at_exit(self)

    @property
    def process_group(self) -> ProcessGroup:
        """The torch ``ProcessGroup`` the ops run on (an escape hatch; do not destroy it)."""
        return self._pg

    @property
    def _pg(self) -> ProcessGroup:
        group = self._group
        if group is None:
            raise CommunicatorAbortedError(f"the {self.name} backend of rank {self.rank} is closed")
        return group

    # -- availability and creation -------------------------------------------------------------
    @classmethod
    def _missing(cls) -> str | None:
        try:
            if importlib.util.find_spec("torch") is None:
                return f"torch is not installed: {INSTALL_HINT}"
            import torch.distributed as dist
        except ImportError as err:
            return f"torch cannot be imported ({err}): {INSTALL_HINT}"
        if not dist.is_available():
            return "this torch build has no torch.distributed: install a build that has it"
        if not dist.is_gloo_available():
            return "this torch build has no gloo backend: install an official torch wheel"
        return None

    @classmethod
    def is_available(cls) -> bool:
        return cls._missing() is None

    @classmethod
    def unavailable_reason(cls) -> str:
        return cls._missing() or "unknown"

    @classmethod
    def create(cls, config: BackendConfig) -> TorchBackend:
        backend = cls(
            join(config, name=cls.name, torch_backend=cls.torch_backend, want_cuda=cls.uses_cuda)
        )
        # Every message envelope names the world and its incarnation (a stale or foreign
        # message is refused, see collectives.backends.envelope).
        backend._engine.comm = comm_id(config.world)
        backend._engine.epoch = config.epoch
        if not cls.uses_cuda and backend.size > 1:
            backend._probe_cma(config.timeout)
        return backend

    def _probe_cma(self, timeout: float) -> None:
        """Who can read whose memory (:func:`cma.probe_world`): the engine's ``cma_sources``
        (peer -> pid this process may read) and ``cma_readers`` (peers that may read it)."""
        cma.probe_world(self, timeout, self._engine)

    # -- helpers -------------------------------------------------------------------------------
    def _check(self, ctx: OpContext) -> None:
        engine = self._engine
        # An abort's reason first: an aborted backend is usually closed soon after.
        if engine.aborted is not None or engine.failed is not None:
            engine.check_usable(ctx.name)
        if self._closed:
            raise CommunicatorAbortedError(
                f"{ctx.name} on rank {self.rank}: the {self.name} backend is closed"
            )

    def _direct_reduction(self, tensor: torch.Tensor, op: ReduceOp) -> Any:
        """gloo's op when ``tensor`` reduces on the fast path (a CPU tensor of a dtype gloo
        reduces as it is, no autograd, something to move), else None."""
        if tensor.is_cpu and not tensor.requires_grad and self.size > 1 and tensor.numel():
            return self._direct[tensor.dtype, op]
        return None

    def _direct_op(
        self,
        post: Callable[[list[torch.Tensor], Any], Any],
        tensor: torch.Tensor,
        key: tuple[Any, ...],
        ctx: OpContext,
        peers: tuple[int, ...],
    ) -> None:
        """One fast-path op: ``post`` (a process-group method) on the tensor itself, with the
        options cached under ``key``, waited for until the deadline."""
        engine = self._engine
        opts = self._opts.get(key) or self._options(key)
        self._hold = tensor
        try:
            work = post([tensor], opts)
        except RuntimeError as err:
            raise engine.map_error(err, ctx, peers) from None
        engine.wait(work, ctx, peers)

    def _options(self, key: tuple[Any, ...]) -> Any:
        """gloo's options for a fast-path op, cached by ``(kind, ..., timeout)``.

        gloo's own timer only has to outlast our deadline (our wait enforces that one), so it
        is the op's whole timeout plus ``GRACE_S``, whenever the op starts.
        """
        c10d, kind, timeout = tt.c10d(), key[0], key[2]
        if kind == "allreduce":
            opts = c10d.AllreduceOptions()
            opts.reduceOp = key[1]
        elif kind == "reduce":
            opts = c10d.ReduceOptions()
            opts.reduceOp = key[1]
            opts.rootRank, opts.rootTensor = key[3], 0
        else:
            opts = c10d.BroadcastOptions()
            opts.rootRank, opts.rootTensor = key[1], 0
        opts.timeout = timedelta(seconds=int(timeout + GRACE_S) + 1)
        if len(self._opts) >= _OPTIONS_CACHED:  # callers passing ever-new timeouts
            self._opts.clear()
        self._opts[key] = opts
        return opts

    def _native(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` goes to the process group as it is (else it is staged on the host)."""
        return tensor.is_cpu or (self.uses_cuda and tensor.is_cuda)

    def _run(self, ctx: OpContext, start: Callable[[], Any], ranks: list[int]) -> None:
        engine = self._engine
        try:
            work = start()
        except RuntimeError as err:
            raise engine.map_error(err, ctx, ranks) from None
        engine.wait(work, ctx, ranks)

    def _link_tag(self, ctx: OpContext) -> int:
        return op_tag(OBJECT_SPACE, ctx.seq)

    # -- point to point ------------------------------------------------------------------------
    def send(self, msg: Encoded, dst: int, tag: int, ctx: OpContext) -> None:
        self._check(ctx)
        objects.send(self._engine, msg, dst, user_tag(tag, ctx.name), ctx)

    def recv(self, src: int, tag: int, ctx: OpContext) -> Encoded:
        self._check(ctx)
        return objects.recv(self._engine, src, user_tag(tag, ctx.name), ctx, codec=self.codec)[0]

    def send_buffer(self, tensor: torch.Tensor, dst: int, tag: int, ctx: OpContext) -> None:
        self.send(encode(tensor), dst, tag, ctx)

    def recv_into(self, tensor: torch.Tensor, src: int, tag: int, ctx: OpContext) -> None:
        self._check(ctx)
        target = tt.flat_bytes(tensor) if tensor.is_cpu else None
        msg, landed = objects.recv(
            self._engine, src, user_tag(tag, ctx.name), ctx, codec=self.codec, direct=target
        )
        value = received_block(msg, tensor, src, ctx, codec=self.codec)  # tensors only
        if not landed:
            tensor.copy_(value.reshape(tensor.shape))

    # -- object collectives --------------------------------------------------------------------
    def broadcast(self, msg: Encoded | None, root: int, ctx: OpContext) -> Encoded:
        self._check(ctx)
        return objects.broadcast(
            self._engine, msg, root, ctx, self._link_tag(ctx), codec=self.codec
        )

    def gather(self, msg: Encoded, root: int, ctx: OpContext) -> list[Encoded] | None:
        self._check(ctx)
        return objects.gather(self._engine, msg, root, ctx, self._link_tag(ctx), codec=self.codec)

    def scatter(self, msgs: list[Encoded] | None, root: int, ctx: OpContext) -> Encoded:
        self._check(ctx)
        return objects.scatter(self._engine, msgs, root, ctx, self._link_tag(ctx), codec=self.codec)

    def allgather(self, msg: Encoded, ctx: OpContext) -> list[Encoded]:
        self._check(ctx)
        return objects.allgather(self._engine, msg, ctx, self._link_tag(ctx), codec=self.codec)

    def barrier(self, ctx: OpContext) -> None:
        self._check(ctx)
        objects.barrier(self._engine, ctx, self._link_tag(ctx), codec=self.codec)

    # -- in-place tensor collectives -----------------------------------------------------------
    # The fast path of allreduce, reduce and broadcast_into: a CPU tensor gloo takes as it is,
    # with cached options, in as few Python frames as will do.  The op after a 1 MiB transfer
    # runs with caches full of its data, where every frame before gloo's call was measured at
    # several µs; torch.distributed's own wrappers are the reference it must keep up with.
    def allreduce(self, tensor: torch.Tensor, op: ReduceOp, ctx: OpContext) -> None:
        self._check(ctx)
        native = self._direct_reduction(tensor, op)
        if native is not None:
            key = ("allreduce", native, ctx.deadline.timeout)
            self._direct_op(self._pg.allreduce, tensor, key, ctx, ())
            if op is _AVG:
                finish_(tensor, op, self.size)
            return
        self._allreduce(tensor, op, ctx)

    def _allreduce(self, tensor: torch.Tensor, op: ReduceOp, ctx: OpContext) -> None:
        if self.size == 1 or tensor.numel() == 0:
            return
        if not self._native(tensor):
            return tt.staged(lambda h: self._allreduce(h[0], op, ctx), tensor)
        plan = tt.reduce_plan(tensor, op, cuda=tensor.is_cuda)
        if plan is None:
            return self._fallback(tensor, op, None, ctx)
        view, native_op = plan
        self._hold = view
        opts = tt.c10d().AllreduceOptions()
        opts.reduceOp = native_op
        opts.timeout = self._engine.op_timeout(ctx)
        self._run(ctx, lambda: self._pg.allreduce([view], opts), [])
        finish_(tensor, op, self.size)
        return None

    def reduce(self, tensor: torch.Tensor, root: int, op: ReduceOp, ctx: OpContext) -> None:
        self._check(ctx)
        native = self._direct_reduction(tensor, op)
        if native is not None:
            key = ("reduce", native, ctx.deadline.timeout, root)
            peers = () if self.rank == root else (root,)
            self._direct_op(self._pg.reduce, tensor, key, ctx, peers)
            if op is _AVG and self.rank == root:
                finish_(tensor, op, self.size)
            return
        self._reduce(tensor, root, op, ctx)

    def _reduce(self, tensor: torch.Tensor, root: int, op: ReduceOp, ctx: OpContext) -> None:
        if self.size == 1 or tensor.numel() == 0:
            return
        if not self._native(tensor):
            return tt.staged(lambda h: self._reduce(h[0], root, op, ctx), tensor)
        plan = tt.reduce_plan(tensor, op, cuda=tensor.is_cuda)
        if plan is None:
            return self._fallback(tensor, op, root, ctx)
        view, native_op = plan
        self._hold = view
        opts = tt.c10d().ReduceOptions()
        opts.reduceOp = native_op
        opts.rootRank = root
        opts.rootTensor = 0
        opts.timeout = self._engine.op_timeout(ctx)
        self._run(ctx, lambda: self._pg.reduce([view], opts), self._root_ranks(root))
        if self.rank == root:
            finish_(tensor, op, self.size)
        return None

    def _fallback(
        self, tensor: torch.Tensor, op: ReduceOp, root: int | None, ctx: OpContext
    ) -> None:
        """Reductions gloo cannot do: binomial reduce (+ broadcast) over point-to-point."""
        host = tensor if tensor.is_cpu else tensor.cpu()
        tag, where = self._link_tag(ctx), NO_ROOT if root is None else root
        # The link decodes what peers send with this rank's options, tensors only.
        with messages.link(self._engine, ctx, tag, root=where, codec=self.codec) as lk:
            if root is None:
                algorithms.allreduce_tensor(lk, host, op)
            else:
                algorithms.reduce_tensor(lk, host, root, op)
        if host is not tensor:
            tensor.copy_(host)

    def broadcast_into(self, tensor: torch.Tensor, root: int, ctx: OpContext) -> None:
        self._check(ctx)
        if (
            tensor.is_cpu
            and not tensor.requires_grad
            and self.size > 1
            and tensor.numel()
            and tensor.dtype in self._movable
        ):
            key = ("broadcast", root, ctx.deadline.timeout)
            peers = () if self.rank == root else (root,)
            self._direct_op(self._pg.broadcast, tensor, key, ctx, peers)
            return
        if self.size == 1 or tensor.numel() == 0:
            return
        if not self._native(tensor):
            return tt.staged(lambda h: self.broadcast_into(h[0], root, ctx), tensor)
        opts = tt.c10d().BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        opts.timeout = self._engine.op_timeout(ctx)
        view = self._hold = tt.wire(tensor)
        self._run(ctx, lambda: self._pg.broadcast([view], opts), self._root_ranks(root))
        return None

    def gatherv_into(
        self, blocks: list[torch.Tensor] | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        # Enveloped messages, as the object gather: a block that does not match what its rank
        # sends is an error here, where a raw gloo receive of the wrong size aborts the process.
        self._check(ctx)
        if not tensor.is_cpu or (blocks is not None and not all(b.is_cpu for b in blocks)):
            super().gatherv_into(blocks, tensor, root, ctx)
            return
        direct = None
        if blocks is not None:
            direct = {r: tt.flat_bytes(b) for r, b in enumerate(blocks) if r != root}
        got = objects.gather_direct(
            self._engine,
            encode(tensor),
            root,
            ctx,
            self._link_tag(ctx),
            codec=self.codec,
            direct=direct,
        )
        if got is None:
            return
        assert blocks is not None
        land_gathered(blocks, got, tensor, root, ctx, codec=self.codec)  # tensors only

    def gather_into(
        self, out: torch.Tensor | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        self._check(ctx)
        if self.size == 1:
            if out is not None:
                out.view(-1).copy_(tensor.reshape(-1))
            return
        if tensor.numel() == 0:
            return
        if not self._native(tensor) or (out is not None and not self._native(out)):
            return tt.staged(lambda h: self.gather_into(h[0], h[1], root, ctx), out, tensor)
        mine = tt.wire(tensor)
        blocks = tt.blocks(out, self.size, mine) if out is not None else None
        if tensor.is_cpu and tt.nbytes(tensor) >= P2P_GATHER_MIN_BYTES:
            return tt.gather_p2p(self._engine, blocks, mine, root, ctx)
        opts = tt.c10d().GatherOptions()
        opts.rootRank = root
        opts.timeout = self._engine.op_timeout(ctx)
        outputs = [list(blocks.unbind(0))] if blocks is not None else []
        self._hold = (outputs, mine)
        self._run(ctx, lambda: self._pg.gather(outputs, [mine], opts), self._root_ranks(root))
        return None

    def allgather_into(self, out: torch.Tensor, tensor: torch.Tensor, ctx: OpContext) -> None:
        self._check(ctx)
        if self.size == 1:
            out.view(-1).copy_(tensor.reshape(-1))
            return
        if tensor.numel() == 0:
            return
        if not self._native(tensor) or not self._native(out):
            return tt.staged(lambda h: self.allgather_into(h[0], h[1], ctx), out, tensor)
        mine = tt.wire(tensor)
        blocks = tt.blocks(out, self.size, mine)
        if tensor.is_cpu and tt.nbytes(tensor) >= P2P_GATHER_MIN_BYTES:
            return tt.allgather_p2p(self._engine, blocks, mine, ctx)
        opts = tt.c10d().AllgatherOptions()
        opts.timeout = self._engine.op_timeout(ctx)
        single = getattr(self._pg, "all_gather_single", None) or self._pg._allgather_base
        flat_out, flat_in = blocks.view(-1), mine.view(-1)  # gloo wants the concatenated form
        self._hold = (flat_out, flat_in)
        self._run(ctx, lambda: single(flat_out, flat_in, opts), [])
        return None

    def scatter_into(
        self, out: torch.Tensor, tensor: torch.Tensor | None, root: int, ctx: OpContext
    ) -> None:
        self._check(ctx)
        if self.size == 1:
            if tensor is not None:
                out.view(-1).copy_(tensor.reshape(-1))
            return
        if out.numel() == 0:
            return
        if not self._native(out) or (tensor is not None and not self._native(tensor)):
            return tt.staged(lambda h: self.scatter_into(h[0], h[1], root, ctx), out, tensor)
        opts = tt.c10d().ScatterOptions()
        opts.rootRank = root
        opts.timeout = self._engine.op_timeout(ctx)
        mine = tt.wire(out)
        inputs = [list(tt.blocks(tensor, self.size, mine).unbind(0))] if tensor is not None else []
        self._hold = (inputs, mine)
        self._run(ctx, lambda: self._pg.scatter([mine], inputs, opts), self._root_ranks(root))
        return None

    def _root_ranks(self, root: int) -> list[int]:
        """Who a rooted op waits on, as far as is known: a non-root waits on the root."""
        return [root] if self.rank != root else []

    # -- lifetime ------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        self._engine.aborted = self._engine.aborted or reason
        # gloo may not support it; the waiting loops notice the flag anyway.
        with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
            if self._group is not None:
                self._group.abort()
        # Also take the group out of torch's registry now (torch's own abort does not wait for
        # pending gloo work, unlike destroy_process_group): otherwise the next init() in this
        # process would build on the broken default group instead of forming a new world.
        import torch.distributed as dist

        abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort_group is not None and self._group is not None and not self._closed:
            mine = (
                self._owns_default and dist.is_initialized() and dist.group.WORLD is self._group
            ) or self._own_group
            if mine:
                with contextlib.suppress(RuntimeError, ValueError, AssertionError):
                    abort_group(self._group)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        import torch.distributed as dist

        group, self._group = self._group, None
        self._hold = None
        destroyed = False
        try:
            if self._owns_default:
                if dist.is_initialized() and dist.group.WORLD is group:
                    dist.destroy_process_group()
                    destroyed = True
            elif self._own_group and dist.is_initialized():
                dist.destroy_process_group(group)
                destroyed = True
        except (RuntimeError, ValueError):
            pass  # already destroyed by the user, or torch shut down first
        # Drop our references so the group is freed now, joining gloo's threads: left for
        # interpreter finalisation, a gloo thread freeing a tensor aborts the process.
        self._engine.release(forget_abandoned=destroyed)
        del group
        # The group no longer needs rank 0's store: without this, rank 0 would keep one
        # connection (and one server thread) per rank of every world ever formed.
        if self._store is not None:
            self._store.close()

    def peers(self) -> dict[int, str]:
        lost = self._engine.lost
        return {r: "lost" if r in lost else "ok" for r in range(self.size) if r != self.rank}


register_backend("gloo", TorchBackend)

__all__ = ["TorchBackend"]
