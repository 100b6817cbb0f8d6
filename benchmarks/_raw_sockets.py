"""Raw engines made of plain Python sockets: ``raw-tcp`` and ``raw-udp``.

They move, for each op, the bytes the op must deliver (``_rawnet.phases_for``) on the same
buffers our call uses, so "vs raw TCP" reads as: how far is the backend from what plain sockets
need for the same traffic on this machine.  ``raw-tcp`` is also the raw engine the ``udp``
backend is timed against in alternation (it has no engine of its own underneath), and both are
extra variants (``--baselines``) in every world, timed in the same processes as ours.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from benchmarks._engines import RawEngine
from benchmarks._ops import ROOT, Buffers, Call
from benchmarks._rawnet import (
    SEGMENT,
    Phase,
    TcpMesh,
    UdpMesh,
    byte_view,
    phases_for,
    pump_tcp,
    pump_udp,
)

if TYPE_CHECKING:
    from collectives import Communicator

BASELINES = ("raw-tcp", "raw-udp")
_F64 = struct.Struct("!d")

_scratch: list[np.ndarray] = []


def _scratch_blocks(nbytes: int, count: int) -> list[np.ndarray]:
    """The root's receive blocks for reductions, shared by every raw engine of the process (they
    run one after another) so that two baselines at 128 MiB do not double the memory."""
    global _scratch
    if len(_scratch) < count or (_scratch and _scratch[0].nbytes < nbytes):
        _scratch = [np.ones(max(nbytes, 4), dtype=np.uint8) for _ in range(count)]
    return [block[:nbytes] for block in _scratch[:count]]


def op_views(op: str, b: Buffers) -> dict[str, list[memoryview]]:
    views: dict[str, list[memoryview]] = {"tensor": [byte_view(b.tensor.numpy())]}
    if b.blocks is not None:
        flat = byte_view(b.blocks.numpy())
        step = len(flat) // b.size
        views["blocks"] = [flat[i * step : (i + 1) * step] for i in range(b.size)]
    if op in ("reduce", "allreduce") and b.is_root:
        views["scratch"] = [byte_view(s) for s in _scratch_blocks(b.tensor.numel() * 4, b.size)]
    return views


class _SocketRaw(RawEngine):
    """Shared by both: schedule the op's phases, then hand each one to the transport."""

    def __init__(self, comm: Communicator) -> None:
        self._rank, self._size = comm.rank, comm.size
        self._token = [memoryview(bytearray(8)) for _ in range(comm.size)]

    def _pump(self, phase: Phase) -> None:
        raise NotImplementedError

    def _gather_release(self, value: float) -> float:
        """Everyone's ``value`` to the root, the max back: a barrier, and the agreement on
        repetition counts where this engine is the world's."""
        self._token[self._rank][:] = _F64.pack(value)
        views = {"tensor": [self._token[self._rank]], "scratch": self._token}
        to_root, from_root = phases_for("barrier", self._rank, self._size, ROOT, views)
        self._pump(to_root)
        if self._rank == ROOT:
            top = max(_F64.unpack(bytes(t))[0] for t in self._token)
            self._token[ROOT][:] = _F64.pack(top)
        self._pump(from_root)
        return float(_F64.unpack(bytes(self._token[self._rank]))[0])

    def barrier(self) -> None:
        self._gather_release(0.0)

    def agree_max(self, value: float) -> float:
        return self._gather_release(value)

    def prepare(self, op: str, b: Buffers) -> Call:
        if op == "barrier":
            return self.barrier
        phases = phases_for(op, self._rank, self._size, ROOT, op_views(op, b))
        pump = self._pump

        def run() -> None:
            for phase in phases:
                pump(phase)

        if op == "allgather":
            own, blocks = b.tensor.numpy(), b.blocks
            assert blocks is not None
            mine = blocks.view(b.size, -1)[self._rank].numpy()

            def run_allgather() -> None:
                run()
                np.copyto(mine, own)  # every engine's allgather lands the own block too

            return run_allgather
        return run


class TcpRaw(_SocketRaw):
    name = "plain TCP sockets"

    def __init__(self, comm: Communicator) -> None:
        super().__init__(comm)
        self.mesh = TcpMesh.build(comm.rank, comm.size, comm.allgather)

    def _pump(self, phase: Phase) -> None:
        pump_tcp(self.mesh, phase)

    def info(self) -> dict[str, str]:
        return {"engine": self.name, "transport": "TCP loopback, TCP_NODELAY, one per pair"}


class UdpBlastRaw(_SocketRaw):
    """Timed as a baseline variant; the world's own engine starts the repetitions."""

    name = "plain UDP GSO/GRO blast"

    def __init__(self, comm: Communicator, segment: int = SEGMENT) -> None:
        super().__init__(comm)
        self.mesh = UdpMesh.build(comm.rank, comm.size, comm.allgather, segment)

    def _pump(self, phase: Phase) -> None:
        pump_udp(self.mesh, phase)

    def info(self) -> dict[str, str]:
        return {
            "engine": self.name,
            "transport": f"UDP loopback, {self.mesh.segment} B datagrams, GSO/GRO, "
            f"window {self.mesh.window} B per pair, no loss recovery",
        }


def baseline_engines(
    comm: Communicator, names: list[str], world_engine: RawEngine, segment: int = SEGMENT
) -> dict[str, RawEngine]:
    """The baseline engines a world times next to ours; raw-tcp is skipped where the world's
    own raw engine is plain TCP already (the udp backend's), so nothing is timed twice."""
    engines: dict[str, RawEngine] = {}
    for name in names:
        if name == "raw-tcp" and isinstance(world_engine, TcpRaw):
            continue
        engines[name] = TcpRaw(comm) if name == "raw-tcp" else UdpBlastRaw(comm, segment)
    return engines
