"""The ``mpi`` backend: thin wrappers over mpi4py's non-blocking buffer calls.

The in-place tensor API maps one call to one MPI collective on a view of the tensor's own
memory (no pickling, no copy): ``broadcast_into`` -> ``Ibcast`` (from 1 MiB with 3+ ranks:
a binomial tree of ``Isend``/``Irecv``, see :meth:`MPIBackend._direct_broadcast`),
``allreduce`` -> ``Iallreduce``, ``reduce`` -> ``Ireduce`` (``Iallreduce`` from 64 KiB: faster
in MPICH), ``gather_into`` -> ``Igather``, ``allgather_into`` -> ``Iallgather``,
``scatter_into`` -> ``Iscatter`` (blocks >= 64 KiB: one ``Isend``/``Irecv`` per rank, see
:meth:`MPIBackend._direct_rooted`), ``send_buffer``/``recv_into`` -> ``Isend``/``Irecv``.  Data
moves as ``MPI.BYTE`` (so bfloat16, float8, complex32 travel like any other type); reductions use
MPI's typed ops where MPI has the type and :mod:`collectives.backends.mpi_reduce` where it does
not.
The object API is in :mod:`collectives.backends.mpi_objects`; request polling, deadlines and
abort in :mod:`collectives.backends.mpi_core`.  Design notes and limits: docs/backend-mpi.md.

Importing this module neither imports mpi4py nor initialises MPI; :meth:`MPIBackend.create` does.
"""

from __future__ import annotations

import ctypes
import importlib.util
from typing import TYPE_CHECKING, Any, ClassVar

from collectives.algorithms.link import binomial_parent_children
from collectives.backends import mpi_fast, mpi_objects, mpi_placement, mpi_reduce, mpi_tuning
from collectives.backends.base import (
    Backend,
    BackendConfig,
    FastLane,
    FastOp,
    OpContext,
    register_backend,
)
from collectives.backends.envelope import comm_id
from collectives.backends.mpi_core import (
    Engine,
    check_plain,
    host_buffer,
    import_mpi,
)
from collectives.backends.mpi_objects import PAYLOAD_TAGS
from collectives.errors import (
    BackendUnavailableError,
    CollectiveMismatchError,
    ConfigurationError,
)
from collectives.reduce_op import ReduceOp, finish_

if TYPE_CHECKING:
    import torch

    from collectives.codec import Encoded

# gather_into/scatter_into blocks of at least this many bytes go as one Isend/Irecv per rank
# instead of MPI's Igather/Iscatter (see MPIBackend._direct_rooted).
DIRECT_MIN_BYTES = 64 << 10
# broadcast_into() of at least this many bytes, with 3+ ranks, goes as the world's broadcast
# plan says (mpi_placement): down a binomial tree of whole-buffer messages where ranks outnumber
# cores (_direct_broadcast), else as a scatter and an allgather (_spread_broadcast).  The tree
# against Ibcast with 3-4 ranks on 2 cores: 0.7-1.0x at 1 MiB, 0.84-1.0x at 16 MiB, but
# 0.8-1.2x at 256 KiB (worse with 3 ranks) and mixed at 64 KiB.
BROADCAST_DIRECT_MIN_BYTES = 1 << 20
# reduce() of at least this many bytes runs as an allreduce: MPICH's (I)reduce measured 4-6x
# slower than its (I)allreduce from 1 MiB up here (0.9 ms vs 0.14 ms at 1 MiB, 2 ranks), about
# even at 64 KiB, faster below.
REDUCE_AS_ALLREDUCE_BYTES = 64 << 10
INSTALL_HINT = "pip install mpi4py mpich (or mpi4py built against your cluster's MPI)"


class MPIBackend(Backend):
    """One rank of ``MPI_COMM_WORLD``, talking over private duplicates of it."""

    name: ClassVar[str] = "mpi"

    def __init__(
        self,
        engine: Engine,
        tuning: dict[str, str] | None = None,
        broadcast_plan: str = "tree",
    ) -> None:
        super().__init__(engine.rank, engine.size)
        self._engine = engine
        # MPICH control variables set for this world (see mpi_tuning), for reports and logs.
        self.tuning: dict[str, str] = dict(tuning or {})
        # How broadcasts of BROADCAST_DIRECT_MIN_BYTES and more move (see mpi_placement).
        self.broadcast_plan = broadcast_plan
        self._mpi = engine.MPI
        self._byte = engine.MPI.BYTE
        self._in_place = engine.MPI.IN_PLACE
        self._natives = _Natives(engine.MPI)

    @property
    def mpi_comm(self) -> Any:
        """The private ``MPI.Comm`` the collectives run on (an escape hatch; do not Free it)."""
        return self._engine.coll

    # -- availability and creation -------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        try:
            return importlib.util.find_spec("mpi4py") is not None
        except (ImportError, ValueError):
            return False

    @classmethod
    def unavailable_reason(cls) -> str:
        return f"mpi4py is not installed: {INSTALL_HINT}"

    @classmethod
    def create(cls, config: BackendConfig) -> MPIBackend:
        try:
            mpi = import_mpi()
        except ImportError as err:
            raise BackendUnavailableError(
                f"backend 'mpi' cannot load mpi4py.MPI ({err}): {INSTALL_HINT}"
            ) from err
        if mpi.Is_finalized():
            raise ConfigurationError("backend 'mpi': MPI is already finalized in this process")
        if not mpi.Is_initialized():  # mpi4py.rc.initialize = False: initialise it ourselves
            mpi.Init_thread(mpi.THREAD_MULTIPLE)
        level = mpi.Query_thread()
        if level < mpi.THREAD_MULTIPLE:
            raise ConfigurationError(
                f"backend 'mpi' needs MPI_THREAD_MULTIPLE (async ops and point-to-point run on "
                f"other threads) but MPI was initialised with thread level {level}: leave "
                "mpi4py.rc.thread_level at its default 'multiple'"
            )
        world = mpi.COMM_WORLD
        rank, size = world.Get_rank(), world.Get_size()
        if config.size is not None and config.size != size:
            raise ConfigurationError(
                f"backend 'mpi': size={config.size} was requested but MPI_COMM_WORLD has {size} "
                f"processes: launch with `mpiexec -n {config.size}` or drop size="
            )
        if config.rank is not None and config.rank != rank:
            raise ConfigurationError(
                f"backend 'mpi': rank={config.rank} was requested but MPI says this process is "
                f"rank {rank}: under mpiexec the rank comes from MPI; drop rank="
            )
        engine = Engine(mpi, world)
        # Every object envelope names the world and its incarnation (a stale or foreign message
        # is refused, see collectives.backends.envelope).
        engine.comm, engine.epoch = comm_id(config.world), config.epoch
        # On the private collective communicator: user code on COMM_WORLD sees no extra traffic.
        tuning = mpi_tuning.tune(mpi, engine.coll)
        return cls(engine, tuning, mpi_placement.broadcast_plan(mpi, engine.coll))

    # -- point to point ------------------------------------------------------------------------
    def send(self, msg: Encoded, dst: int, tag: int, ctx: OpContext) -> None:
        with self._engine.op(ctx, [dst], collective=False) as engine:
            mpi_objects.send(engine, msg, dst, engine.check_tag(tag, ctx), ctx)

    def recv(self, src: int, tag: int, ctx: OpContext) -> Encoded:
        with self._engine.op(ctx, [src], collective=False) as engine:
            return mpi_objects.recv(engine, src, engine.check_tag(tag, ctx), ctx, self.codec)

    def send_buffer(self, tensor: torch.Tensor, dst: int, tag: int, ctx: OpContext) -> None:
        with self._engine.op(ctx, [dst], collective=False) as engine:
            host = _cpu(tensor)
            req = engine.p2p.Isend(host_buffer(self._mpi, host), dst, engine.check_tag(tag, ctx))
            engine.wait([req], ctx, [dst], keep=host, collective=False)

    def recv_into(self, tensor: torch.Tensor, src: int, tag: int, ctx: OpContext) -> None:
        mpi = self._mpi
        with self._engine.op(ctx, [src], collective=False) as engine:
            host = _cpu(tensor)
            buf = host_buffer(mpi, host)
            status = mpi.Status()
            req = engine.p2p.Irecv(buf, src, engine.check_tag(tag, ctx))
            engine.wait(
                [req], ctx, [src], statuses=[status], keep=host, collective=False, cancel=True
            )
            got = status.Get_count(mpi.BYTE)
            if got != buf.nbytes:
                raise CollectiveMismatchError(
                    f"recv_into on rank {self.rank}: rank {src} sent {got} bytes on tag {tag} but "
                    f"this buffer is {tensor.dtype} {tuple(tensor.shape)} ({buf.nbytes} bytes): "
                    "buffers must match (and send_buffer pairs with recv_into, send with recv)",
                    ranks=(self.rank, src),
                )
            _back(tensor, host)

    # -- object collectives --------------------------------------------------------------------
    def broadcast(self, msg: Encoded | None, root: int, ctx: OpContext) -> Encoded:
        with self._engine.op(ctx, _root_peer(self.rank, root)) as engine:
            return mpi_objects.broadcast(engine, msg, root, ctx, self.codec)

    def gather(self, msg: Encoded, root: int, ctx: OpContext) -> list[Encoded] | None:
        with self._engine.op(ctx, _root_peer(self.rank, root)) as engine:
            return mpi_objects.gather(engine, msg, root, ctx, self.codec)

    def scatter(self, msgs: list[Encoded] | None, root: int, ctx: OpContext) -> Encoded:
        with self._engine.op(ctx, _root_peer(self.rank, root)) as engine:
            return mpi_objects.scatter(engine, msgs, root, ctx, self.codec)

    def allgather(self, msg: Encoded, ctx: OpContext) -> list[Encoded]:
        with self._engine.op(ctx) as engine:
            return mpi_objects.allgather(engine, msg, ctx, self.codec)

    def barrier(self, ctx: OpContext) -> None:
        with self._engine.op(ctx) as engine:
            mpi_objects.barrier(engine, ctx)

    # -- in-place tensor collectives -----------------------------------------------------------
    # The fast path of the library: one MPI call on the tensor's own memory, in as few Python
    # frames as will do (no context manager; ``try`` costs nothing until MPI raises).  After a
    # 1 MiB op the caches hold its data, not this code, and every frame before the MPI call was
    # measured at several µs: the lean version runs level with mpi4py's own call.
    def fast_path(self, op: str, lane: FastLane) -> FastOp | None:
        if op == "allreduce":
            return mpi_fast.make_fast_allreduce(self._engine, lane)
        if op == "broadcast_into":
            # The tree and scatter + allgather plans start at this size with 3+ ranks.
            return mpi_fast.make_fast_broadcast_into(self._engine, lane, BROADCAST_DIRECT_MIN_BYTES)
        return None

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp, ctx: OpContext) -> None:
        engine = self._engine
        if engine.halted:
            engine.check_usable(ctx, True)
        host = tensor if tensor.is_cpu else _cpu(tensor)
        native = self._natives[host.dtype, op]
        try:
            if native is None:
                mpi_reduce.allreduce(engine, host, op, ctx)
            else:
                spec = [host_buffer(self._mpi, host), native[0]]
                engine.wait_one(
                    engine.coll.Iallreduce(self._in_place, spec, native[1]), ctx, (), host
                )
        except self._mpi.Exception as err:
            raise engine.failed(err, ctx, ()) from None
        if op is _AVG and native is not None:  # mpi_reduce divides itself
            finish_(host, op, self.size)
        if host is not tensor:
            tensor.copy_(host)

    def reduce(self, tensor: torch.Tensor, root: int, op: ReduceOp, ctx: OpContext) -> None:
        engine, mpi = self._engine, self._mpi
        if engine.halted:
            engine.check_usable(ctx, True)
        is_root = self.rank == root
        peers = () if is_root else (root,)
        host = tensor if tensor.is_cpu else _cpu(tensor)
        native = self._natives[host.dtype, op]
        try:
            if native is None:
                mpi_reduce.reduce(engine, host, root, op, ctx)
            else:
                spec = [host_buffer(mpi, host), native[0]]
                if host.nbytes >= REDUCE_AS_ALLREDUCE_BYTES:
                    # Non-roots' tensors are scratch space (documented), so an allreduce does.
                    req = engine.coll.Iallreduce(self._in_place, spec, native[1])
                elif is_root:
                    req = engine.coll.Ireduce(self._in_place, spec, native[1], root)
                else:
                    req = engine.coll.Ireduce(spec, None, native[1], root)
                engine.wait_one(req, ctx, peers, host)
        except mpi.Exception as err:
            raise engine.failed(err, ctx, peers) from None
        if is_root:
            if op is _AVG and native is not None:
                finish_(host, op, self.size)
            if host is not tensor:
                tensor.copy_(host)

    def broadcast_into(self, tensor: torch.Tensor, root: int, ctx: OpContext) -> None:
        engine = self._engine
        if engine.halted:
            engine.check_usable(ctx, True)
        peers = () if self.rank == root else (root,)
        host = tensor if tensor.is_cpu else _cpu(tensor)
        plan = self.broadcast_plan
        if host.nbytes < BROADCAST_DIRECT_MIN_BYTES or self.size <= 2:
            plan = "native"  # one message either way at 2 ranks
        elif plan == "scatter_allgather" and host.nbytes % self.size:
            plan = "tree"  # pieces of equal size only (every power-of-two world at 1 MiB+)
        try:
            if plan == "scatter_allgather":
                self._spread_broadcast(engine, host, root, ctx)
            elif plan == "tree":
                self._direct_broadcast(engine, host, root, ctx)
            else:
                req = engine.coll.Ibcast(host_buffer(self._mpi, host), root)
                engine.wait_one(req, ctx, peers, host)
        except self._mpi.Exception as err:
            raise engine.failed(err, ctx, peers) from None
        if host is not tensor:
            tensor.copy_(host)

    def gather_into(
        self, out: torch.Tensor | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        engine, mpi = self._engine, self._mpi
        if engine.halted:
            engine.check_usable(ctx, True)
        mine = tensor if tensor.is_cpu else _cpu(tensor)
        direct = mine.nbytes >= DIRECT_MIN_BYTES
        try:
            if self.rank != root:
                buf = host_buffer(mpi, mine)
                if direct:
                    req = engine.coll.Isend(buf, root, ctx.seq % PAYLOAD_TAGS)
                else:
                    req = engine.coll.Igather(buf, None, root)
                engine.wait_one(req, ctx, (root,), mine)
                return
            assert out is not None
            host = out if out.is_cpu else _cpu(out)
            if direct:
                self._direct_rooted(engine, host, mine, root, ctx, gather=True)
            else:
                req = engine.coll.Igather(host_buffer(mpi, mine), host_buffer(mpi, host), root)
                engine.wait_one(req, ctx, (), (mine, host))
        except mpi.Exception as err:
            raise engine.failed(err, ctx, () if self.rank == root else (root,)) from None
        if host is not out:
            out.copy_(host)

    def _direct_broadcast(
        self, engine: Engine, host: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        """Broadcast of a large buffer down a binomial tree of whole-buffer messages.

        With more ranks than cores MPICH's ``(I)bcast`` of 1-16 MiB ran up to 2.5-3x slower here
        than these ``Isend``/``Irecv`` in a bare mpi4py loop (each rank receives the buffer once,
        in one copy, then passes it on), for the reason :meth:`_direct_rooted` gives.  Two
        ranks: one message either way, so ``Ibcast`` stays.
        """
        mpi = self._mpi
        size, coll = self.size, engine.coll
        tag, buf = ctx.seq % PAYLOAD_TAGS, host_buffer(mpi, host)
        parent, children = binomial_parent_children((self.rank - root) % size, size)
        if parent is not None:
            src = (parent + root) % size
            status = mpi.Status()
            req = coll.Irecv(buf, src, tag)
            engine.wait([req], ctx, sources=[src], statuses=[status], keep=host)
            _check_count(self.rank, src, status.Get_count(self._byte), host.nbytes, ctx)
        targets = [(child + root) % size for child in children]
        if targets:
            reqs = [coll.Isend(buf, dst, tag) for dst in targets]
            engine.wait(reqs, ctx, sources=targets, keep=host)

    def _spread_broadcast(
        self, engine: Engine, host: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        """Broadcast of a large buffer as a scatter of ``1/size`` pieces and an in-place allgather.

        Each rank receives its own piece straight from the root, then ``Iallgather`` fills in the
        rest: with a core per rank the pieces move in parallel (mpi_placement has the figures).
        Requires ``host.nbytes % size == 0``.
        """
        mpi, rank, size, coll = self._mpi, self.rank, self.size, engine.coll
        at = mpi.buffer.fromaddress
        check_plain(host)
        tag, base, piece = _payload_tag(ctx), host.data_ptr(), host.nbytes // size
        if rank == root:
            targets = [r for r in range(size) if r != root]
            reqs = [coll.Isend(at(base + r * piece, piece), r, tag) for r in targets]
            # Sent pieces are written again (same bytes) by the allgather: finish sending first.
            engine.wait(reqs, ctx, sources=targets, keep=host)
        else:
            status = mpi.Status()
            req = coll.Irecv(at(base + rank * piece, piece), root, tag)
            engine.wait([req], ctx, sources=[root], statuses=[status], keep=host)
            _check_count(rank, root, status.Get_count(self._byte), piece, ctx)
        req = coll.Iallgather(self._in_place, [at(base, host.nbytes), piece, self._byte])
        engine.wait_one(req, ctx, (), host)

    def _direct_rooted(
        self,
        engine: Engine,
        blocks: torch.Tensor,
        mine: torch.Tensor,
        root: int,
        ctx: OpContext,
        *,
        gather: bool,
    ) -> None:
        """Root's side of a gather (receive) or scatter (send) as one message per rank.

        For large blocks this beats MPICH's ``Igather``/``Iscatter`` (and even the blocking
        calls) several-fold with more ranks than cores: a large point-to-point message moves in
        one copy without needing the receiver to drive progress, where the tree collectives
        forward data in small pieces through intermediate ranks.  ``blocks`` holds ``size``
        blocks of ``mine``'s byte size, addressed directly (no array per block).
        """
        mpi = self._mpi
        at, coll = mpi.buffer.fromaddress, engine.coll
        check_plain(blocks)
        check_plain(mine)
        tag, nbytes, base = _payload_tag(ctx), mine.nbytes, blocks.data_ptr()
        reqs, statuses = [], []
        sources = [r for r in range(self.size) if r != root]
        for r in sources:
            if gather:
                reqs.append(coll.Irecv(at(base + r * nbytes, nbytes), r, tag))
                statuses.append(mpi.Status())
            else:
                reqs.append(coll.Isend(at(base + r * nbytes, nbytes), r, tag))
        # Root's own block is copied once every message is posted, so the copy overlaps them.
        own = base + root * nbytes
        if gather:
            ctypes.memmove(own, mine.data_ptr(), nbytes)
        else:
            ctypes.memmove(mine.data_ptr(), own, nbytes)
        engine.wait(
            reqs, ctx, sources=sources, statuses=statuses if gather else None, keep=(blocks, mine)
        )
        for r, status in zip(sources, statuses, strict=False):
            _check_count(self.rank, r, status.Get_count(self._byte), nbytes, ctx)

    def allgather_into(self, out: torch.Tensor, tensor: torch.Tensor, ctx: OpContext) -> None:
        engine, mpi = self._engine, self._mpi
        if engine.halted:
            engine.check_usable(ctx, True)
        host = out if out.is_cpu else _cpu(out)
        mine = tensor if tensor.is_cpu else _cpu(tensor)
        try:
            req = engine.coll.Iallgather(host_buffer(mpi, mine), host_buffer(mpi, host))
            engine.wait_one(req, ctx, (), (mine, host))
        except mpi.Exception as err:
            raise engine.failed(err, ctx, ()) from None
        if host is not out:
            out.copy_(host)

    def scatter_into(
        self, out: torch.Tensor, tensor: torch.Tensor | None, root: int, ctx: OpContext
    ) -> None:
        engine, mpi = self._engine, self._mpi
        if engine.halted:
            engine.check_usable(ctx, True)
        peers = () if self.rank == root else (root,)
        host = out if out.is_cpu else _cpu(out)
        direct = host.nbytes >= DIRECT_MIN_BYTES
        try:
            if self.rank == root:
                assert tensor is not None
                src = tensor if tensor.is_cpu else _cpu(tensor)
                if direct:
                    self._direct_rooted(engine, src, host, root, ctx, gather=False)
                else:
                    req = engine.coll.Iscatter(host_buffer(mpi, src), host_buffer(mpi, host), root)
                    engine.wait_one(req, ctx, (), (src, host))
            elif direct:
                status = mpi.Status()
                req = engine.coll.Irecv(host_buffer(mpi, host), root, ctx.seq % PAYLOAD_TAGS)
                engine.wait([req], ctx, peers, statuses=[status], keep=host)
                _check_count(self.rank, root, status.Get_count(self._byte), host.nbytes, ctx)
            else:
                req = engine.coll.Iscatter(None, host_buffer(mpi, host), root)
                engine.wait_one(req, ctx, peers, host)
        except mpi.Exception as err:
            raise engine.failed(err, ctx, peers) from None
        if host is not out:
            out.copy_(host)

    # -- lifetime ------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """Fail every pending op promptly (their polling loops see the flag) and every later one.

        MPI cannot cancel a collective in flight: its requests are abandoned (their buffers kept
        alive) and this rank's communicators are never used again.
        """
        self._engine.abort(reason)

    def close(self) -> None:
        """Free the private communicators if nothing is pending.  Never finalizes MPI."""
        self._engine.close()

    def peers(self) -> dict[int, str]:
        """MPI reports no liveness: every other rank is "ok" (a dead process ends the job)."""
        return {r: "ok" for r in range(self.size) if r != self.rank}


class _Natives(dict[tuple[Any, ReduceOp], "tuple[Any, Any] | None"]):
    """``(dtype, op)`` -> MPI's ``(datatype, op)``, or None where MPI cannot reduce it: filled on
    first use, then one dict lookup per op."""

    def __init__(self, mpi: Any) -> None:
        super().__init__()
        self._mpi = mpi

    def __missing__(self, key: tuple[Any, ReduceOp]) -> tuple[Any, Any] | None:
        found = self[key] = mpi_reduce.native_reduction(self._mpi, *key)
        return found


_AVG = ReduceOp.AVG


def _root_peer(rank: int, root: int) -> list[int]:
    """Whom a rank of a rooted op can name when it times out: non-roots wait for the root."""
    return [] if rank == root else [root]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself on the CPU; a staging copy for device tensors (MPI here is not GPU-aware)."""
    return t if t.is_cpu else t.detach().cpu()


def _payload_tag(ctx: OpContext) -> int:
    return ctx.seq % PAYLOAD_TAGS


def _check_count(rank: int, src: int, got: int, want: int, ctx: OpContext) -> None:
    if got != want:
        raise CollectiveMismatchError(
            f"{ctx.name} on rank {rank}: rank {src} sent {got} bytes where {want} were expected: "
            "buffers must have the same size and dtype on every rank",
            ranks=(rank, src),
        )


def _back(t: torch.Tensor, host: torch.Tensor) -> None:
    if host is not t:
        t.copy_(host)


register_backend("mpi", MPIBackend)
