"""The MPI engine under :mod:`collectives.backends.mpi`: private communicators, request polling.

Nothing here imports mpi4py at module level: :class:`Engine` receives the ``mpi4py.MPI`` module
from :meth:`MPIBackend.create`, so importing the backend package never initialises MPI.

Every operation is a non-blocking MPI call whose requests :meth:`Engine.wait` polls until they
complete, the op's deadline passes, or :meth:`Engine.abort` is called.  Polling spins on
``Test`` with ``sched_yield`` for a few milliseconds (a blocking MPI call spins too, so short ops
cost the same as the raw engine, and an oversubscribed core is handed to the peer that needs it),
then sleeps a small fraction of the time already waited, capped at 1 ms, so that a rank that waits
for seconds costs almost no CPU.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from collectives.errors import (
    CollectiveMismatchError,
    CommunicatorAbortedError,
    ConnectionLostError,
    InvalidArgumentError,
    TransportError,
)

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

    from collectives.backends.base import OpContext

SPIN_S = 0.005  # poll with sched_yield for this long before sleeping
SLEEP_FRACTION = 0.02  # then sleep this fraction of the time waited so far ...
MIN_SLEEP_S = 50e-6
MAX_SLEEP_S = 1e-3  # ... capped here
CANCEL_GRACE_S = 0.5  # how long a cancelled receive may take to report back

_monotonic = time.monotonic
sched_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def import_mpi() -> Any:
    """``mpi4py.MPI`` (initialises MPI on first import, as mpi4py does)."""
    from mpi4py import MPI

    return MPI


class Engine:
    """One rank's private MPI communicators and the state every op checks.

    Three duplicates of ``MPI_COMM_WORLD`` keep traffic apart: ``coll`` carries collectives (and
    the point-to-point payloads of object collectives), ``p2p`` carries user point-to-point
    messages under the user's tag, ``data`` carries the payload of object ``send``\\s under a
    per-message tag, so concurrent receivers can never take each other's buffers.
    """

    def __init__(self, mpi: Any, world: Any) -> None:
        self.MPI = mpi
        self.rank: int = world.Get_rank()
        self.size: int = world.Get_size()
        self.coll = world.Dup()
        self.p2p = world.Dup()
        self.data = world.Dup()
        for comm, name in ((self.coll, "coll"), (self.p2p, "p2p"), (self.data, "p2p-data")):
            comm.Set_name(f"collectives.{name}")
        tag_ub = self.coll.Get_attr(mpi.TAG_UB)
        self.tag_ub: int = int(tag_ub) if tag_ub else 32767
        self.aborted: str | None = None
        self.broken: str | None = None  # a collective was left pending: coll is out of step
        self.closed = False
        # Any of the three above: collectives check this one flag (see MPIBackend's fast path).
        self.halted = False
        # Requests given up on (MPI cannot cancel collectives or, portably, sends) and the buffers
        # they may still read or write: kept alive so that MPI never touches freed memory.
        self.abandoned: list[tuple[list[Any], object]] = []
        self._lock = threading.Lock()
        self._next_msg = 0
        # The world every object envelope names (collectives.backends.envelope): set at create.
        self.comm = 0
        self.epoch = 0

    # -- op bracketing ---------------------------------------------------------------------------
    def op(self, ctx: OpContext, peers: Sequence[int] = (), *, collective: bool = True) -> _Op:
        """``with engine.op(ctx, ...)``: refuse if unusable, map MPI errors to typed ones."""
        return _Op(self, ctx, peers, collective)

    def mark_broken(self, reason: str) -> None:
        """A collective was left unfinished or failed in MPI: the ranks are out of step."""
        if self.broken is None:
            self.broken = reason
        self.halted = True

    def failed(self, err: Any, ctx: OpContext, peers: Sequence[int]) -> Exception:
        """The typed error for an ``MPI.Exception`` raised inside a collective (which breaks it)."""
        self.mark_broken(f"{ctx.name} #{ctx.seq} failed in MPI")
        return self.map_error(err, ctx, peers)

    def check_usable(self, ctx: OpContext, collective: bool) -> None:
        if self.aborted is not None:
            raise CommunicatorAbortedError(
                f"{ctx.name} on rank {self.rank}: the mpi backend was aborted ({self.aborted})"
            )
        if self.closed:
            raise CommunicatorAbortedError(f"{ctx.name} on rank {self.rank}: the backend is closed")
        if collective and self.broken is not None:
            raise CommunicatorAbortedError(
                f"{ctx.name} on rank {self.rank}: an earlier collective failed ({self.broken}) and "
                "MPI cannot cancel it, so the ranks are out of step; create a new communicator"
            )

    def next_message_tag(self) -> int:
        """A fresh tag on ``data`` for one object send (unique per sender until it wraps)."""
        with self._lock:
            self._next_msg = (self._next_msg + 1) % (self.tag_ub + 1)
            return self._next_msg

    def check_tag(self, tag: int, ctx: OpContext) -> int:
        if not isinstance(tag, int) or not 0 <= tag <= self.tag_ub:
            raise InvalidArgumentError(
                f"{ctx.name}: tag={tag!r} is not in 0..{self.tag_ub} (MPI_TAG_UB of this MPI)"
            )
        return tag

    # -- waiting ---------------------------------------------------------------------------------
    def wait_one(self, req: Any, ctx: OpContext, peers: Sequence[int], keep: object) -> None:
        """:meth:`wait` for one collective request: the lean loop of the in-place fast path.

        Spins with ``sched_yield`` (as :meth:`wait` does first) without building the general
        loop's state; past the spin, or on abort, :meth:`wait` takes over.
        """
        if not spin(self, req, ctx.deadline.at):
            self.wait([req], ctx, peers, keep=keep)

    def wait(
        self,
        reqs: list[Any],
        ctx: OpContext,
        peers: Sequence[int] = (),
        *,
        sources: Sequence[int] | None = None,
        statuses: list[Any] | None = None,
        keep: object = None,
        collective: bool = True,
        cancel: bool = False,
    ) -> None:
        """Poll ``reqs`` until all complete; raise at the deadline or on abort.

        ``sources[i]`` is the rank request ``i`` waits for (or -1): at the deadline the error names
        the sources of unfinished requests, else ``peers``.  ``keep`` is whatever memory the
        requests use; it stays referenced if they must be abandoned.  ``cancel`` cancels unfinished
        receives at the deadline (point-to-point only); a receive that turns out to have completed
        before the cancel took effect counts as success.
        """
        mpi = self.MPI
        if statuses is None:  # fast path: already done (small messages usually are)
            if len(reqs) == 1:
                if reqs[0].Test():
                    return
            elif mpi.Request.Testall(reqs):
                return
        elif not reqs:
            return
        if len(reqs) == 1:
            req = reqs[0]
            if statuses is None:
                test = req.Test
            else:
                status = statuses[0]

                def test() -> bool:
                    return bool(req.Test(status))
        else:

            def test() -> bool:
                return bool(mpi.Request.Testall(reqs, statuses))

        if test():
            return
        start = _monotonic()
        spin_end = start + SPIN_S
        deadline = ctx.deadline.at
        while True:
            if self.aborted is not None:
                self._give_up(
                    reqs,
                    statuses,
                    keep,
                    collective=collective,
                    cancel=cancel,
                    reason=f"aborted: {self.aborted}",
                )
                raise CommunicatorAbortedError(
                    f"{ctx.name} on rank {self.rank}: aborted while waiting ({self.aborted})"
                )
            now = _monotonic()
            if now >= deadline:
                missing = self._unfinished_sources(reqs, sources)
                reason = f"{ctx.name} #{ctx.seq} timed out"
                if self._give_up(
                    reqs, statuses, keep, collective=collective, cancel=cancel, reason=reason
                ):
                    return
                raise ctx.deadline.error(missing or peers)
            if now < spin_end:
                sched_yield()
            else:
                time.sleep(min(MAX_SLEEP_S, max(MIN_SLEEP_S, (now - start) * SLEEP_FRACTION)))
            if test():
                return

    def _unfinished_sources(self, reqs: list[Any], sources: Sequence[int] | None) -> list[int]:
        if sources is None:
            return []
        missing = set()
        for req, src in zip(reqs, sources, strict=True):
            if src >= 0 and req and not req.Get_status():
                missing.add(src)
        return sorted(missing)

    def _give_up(
        self,
        reqs: list[Any],
        statuses: list[Any] | None,
        keep: object,
        *,
        collective: bool,
        cancel: bool,
        reason: str,
    ) -> bool:
        """Cancel or abandon unfinished requests; True if all completed uncancelled after all."""
        mpi = self.MPI
        if cancel:
            for req in reqs:
                if req:
                    req.Cancel()
            final = statuses if statuses is not None else [mpi.Status() for _ in reqs]
            end = _monotonic() + CANCEL_GRACE_S
            while True:
                if mpi.Request.Testall(reqs, final):
                    return not any(st.Is_cancelled() for st in final)
                if _monotonic() >= end:
                    break
                time.sleep(MIN_SLEEP_S)
        with self._lock:
            self._prune_locked()
            self.abandoned.append((list(reqs), keep))
        if collective:
            self.mark_broken(reason)
        return False

    def _prune_locked(self) -> None:
        """Forget abandoned requests that have completed since (a late peer caught up)."""
        testall = self.MPI.Request.Testall
        self.abandoned = [(reqs, keep) for reqs, keep in self.abandoned if not testall(reqs)]

    # -- lifetime --------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        if self.aborted is None:
            self.aborted = reason
        self.halted = True

    def close(self) -> None:
        """Free the private communicators unless an op was abandoned on them.

        (Freeing a communicator with operations still running is legal MPI: they complete
        normally.  Abandoned ones may never complete, so their communicators are left to
        mpi4py's ``MPI_Finalize`` at exit.)
        """
        if self.closed:
            return
        self.closed = True
        self.halted = True
        with self._lock:
            self._prune_locked()
            if self.abandoned:
                return
        try:
            if not self.MPI.Is_finalized():
                for comm in (self.coll, self.p2p, self.data):
                    comm.Free()
        except self.MPI.Exception:  # pragma: no cover - nothing useful to do at close
            pass

    # -- errors ----------------------------------------------------------------------------------
    def map_error(self, err: Any, ctx: OpContext, peers: Sequence[int]) -> Exception:
        """An ``MPI.Exception`` as the library's typed error."""
        mpi = self.MPI
        try:
            cls = err.Get_error_class()
            text = " ".join(str(err.Get_error_string()).split())
        except Exception:  # pragma: no cover - a broken error object
            cls, text = -1, str(err)
        if cls == mpi.ERR_TRUNCATE:
            return CollectiveMismatchError(
                f"{ctx.name} on rank {self.rank}: MPI received a message longer than the buffer "
                f"posted for it ({text}): the ranks called different operations, or passed "
                "buffers of different sizes",
                ranks=(self.rank, *peers),
            )
        proc_failed = getattr(mpi, "ERR_PROC_FAILED", None)
        if proc_failed is not None and cls == proc_failed:
            return ConnectionLostError(
                f"{ctx.name} on rank {self.rank}: MPI reports a failed process ({text})",
                ranks=peers,
            )
        return TransportError(f"{ctx.name} on rank {self.rank}: MPI error ({text})")


class _Op:
    """Bracket of one backend op (a small class: cheaper than ``contextlib.contextmanager``)."""

    __slots__ = ("collective", "ctx", "engine", "peers")

    def __init__(self, engine: Engine, ctx: OpContext, peers: Sequence[int], collective: bool):
        self.engine = engine
        self.ctx = ctx
        self.peers = peers
        self.collective = collective

    def __enter__(self) -> Engine:
        engine = self.engine
        if engine.halted:
            engine.check_usable(self.ctx, self.collective)
        return engine

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        engine = self.engine
        if exc is not None and isinstance(exc, engine.MPI.Exception):
            if self.collective:
                raise engine.failed(exc, self.ctx, self.peers) from None
            raise engine.map_error(exc, self.ctx, self.peers) from None


# -- tensors as MPI buffers ----------------------------------------------------------------------
def host_bytes(t: torch.Tensor) -> npt.NDArray[Any]:
    """A numpy view of a contiguous CPU tensor's memory, to pass to MPI as ``[view, MPI.BYTE]``.

    dtypes numpy knows come back as themselves (one ``.numpy()`` call, the fast path); bfloat16,
    float8, complex32... come back as their raw bytes.  Either way no data is copied.
    """
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        pass
    import torch

    if t.requires_grad:
        t = t.detach()
    if t.is_conj() or t.is_neg():
        raise InvalidArgumentError(
            "a lazily conjugated or negated tensor view has no memory of its own to send or "
            "receive into: call .resolve_conj() / .resolve_neg() first"
        )
    try:
        return t.numpy()
    except TypeError:  # no numpy dtype: move its bytes
        return t.reshape(-1).view(torch.uint8).numpy()


def spin(engine: Engine, req: Any, deadline_at: float) -> bool:
    """Poll one request with ``sched_yield`` for up to ``SPIN_S`` (True: it completed).

    The first phase of :meth:`Engine.wait`, without its state: callers hand a request still
    pending afterwards (or on abort) to :meth:`Engine.wait`.
    """
    test = req.Test
    if test():
        return True
    end = min(_monotonic() + SPIN_S, deadline_at)
    while engine.aborted is None and _monotonic() < end:
        sched_yield()
        if test():
            return True
    return False


def host_buffer(mpi: Any, t: torch.Tensor) -> Any:
    """An ``MPI.buffer`` over a contiguous CPU tensor's memory (any dtype, no copy).

    A third of the cost of :func:`host_bytes` (no numpy array is built), which shows on every
    op at 1 MiB.  The buffer does not own the memory: callers keep ``t`` alive (``keep=``) until
    MPI is done with it.
    """
    if t.is_conj() or t.is_neg():
        check_plain(t)
    return mpi.buffer.fromaddress(t.data_ptr(), t.nbytes)


def check_plain(t: torch.Tensor) -> None:
    """Refuse views whose memory does not hold their values (MPI would move the wrong bytes)."""
    if t.is_conj() or t.is_neg():
        raise InvalidArgumentError(
            "a lazily conjugated or negated tensor view has no memory of its own to send or "
            "receive into: call .resolve_conj() / .resolve_neg() first"
        )


def byte_view(buf: memoryview) -> memoryview:
    """A flat byte view of a contiguous buffer (pickle's out-of-band views may be typed)."""
    if buf.ndim == 1 and buf.format == "B":
        return buf
    return buf.cast("B")
