"""The raw engines our library is measured against, doing the same job on the same buffers.

* gloo: plain ``torch.distributed`` calls on the process group the backend set up;
* mpi: mpi4py's buffer API (``Bcast``, ``Gather``...) on ``tensor.numpy()``, on the backend's own
  MPI communicator;
* local: a plain memcpy of the bytes the rank receives: the floor no in-process transport beats;
* udp: plain TCP sockets moving the bytes the op delivers (``_raw_sockets``): our own transport
  has no engine underneath, so the floor it is held to is what plain sockets do.

Each engine also supplies the barrier that starts every timed repetition and the max-reduction
the ranks use to agree on iteration counts, so neither of those goes through the code under test.
"""

from __future__ import annotations

import abc
import threading
import types
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks._ops import ROOT, Buffers, Call

if TYPE_CHECKING:
    from collectives import Communicator


class RawEngine(abc.ABC):
    """One rank's handle on the engine underneath a backend."""

    name = ""

    @abc.abstractmethod
    def prepare(self, op: str, b: Buffers) -> Call:
        """The engine's own call for ``op`` on ``b``, ready to time."""

    @abc.abstractmethod
    def barrier(self) -> None: ...

    @abc.abstractmethod
    def agree_max(self, value: float) -> float:
        """The largest ``value`` over all ranks (every rank must call it)."""

    def info(self) -> dict[str, str]:
        return {"engine": self.name}


def _find_handle(backend: object, kind: type, size: int, prefer: str) -> tuple[Any, str] | None:
    """The engine handle a backend keeps, and where: ``(object, "backend._engine.coll")``.

    Backends keep it in attributes whose names are theirs to choose, so search two levels of
    attributes (modules excluded: ``MPI.COMM_SELF`` is an Intracomm too) for objects of ``kind``
    spanning the whole world, preferring a name containing ``prefer``.
    """
    found: list[tuple[Any, str]] = []
    seen = {id(backend)}
    frontier: list[tuple[object, str]] = [(backend, "backend")]
    for _ in range(2):
        nxt: list[tuple[object, str]] = []
        for holder, path in frontier:
            for name, value in list(getattr(holder, "__dict__", {}).items()):
                if id(value) in seen or isinstance(value, types.ModuleType):
                    continue
                seen.add(id(value))
                if isinstance(value, kind):
                    found.append((value, f"{path}.{name}"))
                else:
                    nxt.append((value, f"{path}.{name}"))
        frontier = nxt
    whole = [(obj, path) for obj, path in found if _span(obj) == size]
    for obj, path in whole:
        if prefer in path.rsplit(".", 1)[-1]:
            return obj, path
    return whole[0] if whole else None


def _span(handle: Any) -> int | None:
    for method in ("Get_size", "size"):
        try:
            return int(getattr(handle, method)())
        except Exception:
            continue
    return None


class GlooRaw(RawEngine):
    name = "torch.distributed gloo"

    def __init__(self, comm: Communicator) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                "the gloo backend did not initialise torch.distributed; raw gloo calls need it"
            )
        self._dist = dist
        found = _find_handle(comm.engine, dist.ProcessGroup, comm.size, "group")
        self._group: Any = None  # None: the default group
        self._where = "default group"
        if found is not None:
            self._group, self._where = found
        self._gather_single = getattr(dist, "all_gather_single", None)

    def prepare(self, op: str, b: Buffers) -> Call:
        dist, group, t, big = self._dist, self._group, b.tensor, b.blocks
        views = list(big.view(b.size, -1).unbind(0)) if big is not None else None
        if op == "allgather":
            assert big is not None
            single = self._gather_single
            if single is not None:
                return lambda: single(big, t, group=group)

            def allgather() -> None:
                with warnings.catch_warnings():  # some versions deprecate this name
                    warnings.simplefilter("ignore", FutureWarning)
                    dist.all_gather_into_tensor(big, t, group=group)

            return allgather
        calls: dict[str, Call] = {
            "broadcast": lambda: dist.broadcast(t, src=ROOT, group=group),
            "scatter": lambda: dist.scatter(t, views, src=ROOT, group=group),
            "gather": lambda: dist.gather(t, views, dst=ROOT, group=group),
            "allreduce": lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group),
            "reduce": lambda: dist.reduce(t, dst=ROOT, op=dist.ReduceOp.SUM, group=group),
            "barrier": self.barrier,
            "p2p": _by_rank(
                b.rank,
                lambda: dist.send(t, 1, group=group),
                lambda: dist.recv(t, 0, group=group),
            ),
        }
        return calls[op]

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)

    def agree_max(self, value: float) -> float:
        import torch

        t = torch.tensor([value], dtype=torch.float64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self._group)
        return float(t.item())

    def info(self) -> dict[str, str]:
        return {"engine": self.name, "process_group": self._where}


class MpiRaw(RawEngine):
    name = "mpi4py buffer API"

    def __init__(self, comm: Communicator) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        public = getattr(comm.engine, "mpi_comm", None)
        if isinstance(public, MPI.Intracomm):
            found: tuple[Any, str] | None = (public, "backend.mpi_comm")
        else:
            found = _find_handle(comm.engine, MPI.Intracomm, comm.size, "coll")
        self._comm: Any = MPI.COMM_WORLD
        self._where = "COMM_WORLD"
        if found is not None:
            self._comm, self._where = found

    def prepare(self, op: str, b: Buffers) -> Call:
        mpi, c = self._mpi, self._comm
        a = b.tensor.numpy()
        big = b.blocks.numpy() if b.blocks is not None else None
        root = b.is_root
        calls: dict[str, Call] = {
            "broadcast": lambda: c.Bcast(a, root=ROOT),
            "scatter": lambda: c.Scatter(big, a, root=ROOT),
            "gather": lambda: c.Gather(a, big, root=ROOT),
            "allgather": lambda: c.Allgather(a, big),
            "allreduce": lambda: c.Allreduce(mpi.IN_PLACE, a, op=mpi.SUM),
            # In place on root, as our reduce is.
            "reduce": (
                (lambda: c.Reduce(mpi.IN_PLACE, a, op=mpi.SUM, root=ROOT))
                if root
                else (lambda: c.Reduce(a, None, op=mpi.SUM, root=ROOT))
            ),
            "barrier": c.Barrier,
            "p2p": _by_rank(b.rank, lambda: c.Send(a, 1), lambda: c.Recv(a, 0)),
        }
        return calls[op]

    def barrier(self) -> None:
        self._comm.Barrier()

    def agree_max(self, value: float) -> float:
        return float(self._comm.allreduce(value, op=self._mpi.MAX))

    def info(self) -> dict[str, str]:
        return {
            "engine": self.name,
            "communicator": self._where,
            "mpi_library": self._mpi.Get_library_version().strip().splitlines()[0],
        }


def _by_rank(rank: int, sender: Call, receiver: Call) -> Call:
    """p2p: rank 0 sends, rank 1 receives, any other rank sits the cell out."""
    return {0: sender, 1: receiver}.get(rank, lambda: None)


class LocalShared:
    """State the in-process ranks share: a thread barrier and a slot per rank for agreement."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size)
        self.values = [0.0] * size


class MemcpyRaw(RawEngine):
    """Floor reference for the threaded ``local`` backend: copy the bytes this rank receives."""

    name = "memcpy"

    def __init__(self, comm: Communicator, shared: LocalShared) -> None:
        self._rank = comm.rank
        self._shared = shared

    def prepare(self, op: str, b: Buffers) -> Call:
        if op == "barrier":
            return self.barrier
        receives_blocks = op in ("gather", "allgather")
        dst = b.blocks if receives_blocks else b.tensor
        receives = {
            "broadcast": not b.is_root,
            "scatter": True,
            "gather": b.is_root,
            "allgather": True,
            "allreduce": True,
            "reduce": b.is_root,
            "p2p": b.rank == 1,
        }[op]
        if dst is None or not receives:
            return lambda: None
        out = dst.numpy()
        src = np.ones_like(out)  # ones_like writes every page: no first-touch faults when timed
        return lambda: np.copyto(out, src)

    def barrier(self) -> None:
        self._shared.barrier.wait()

    def agree_max(self, value: float) -> float:
        self._shared.values[self._rank] = value
        self._shared.barrier.wait()
        result = max(self._shared.values)
        self._shared.barrier.wait()  # nobody overwrites a slot before everyone has read
        return result


def raw_engine(comm: Communicator, shared: LocalShared | None = None) -> RawEngine:
    if comm.backend == "gloo":
        return GlooRaw(comm)
    if comm.backend == "mpi":
        return MpiRaw(comm)
    if comm.backend == "local":
        if shared is None:
            raise ValueError("the local backend's raw engine needs the ranks' shared state")
        return MemcpyRaw(comm, shared)
    if comm.backend == "udp":
        # No engine underneath: it is held to plain TCP sockets moving the same bytes.
        from benchmarks._raw_sockets import TcpRaw

        return TcpRaw(comm)
    raise ValueError(f"no raw engine to compare the {comm.backend!r} backend with")
