"""MPICH's algorithm for the non-blocking allgather, chosen through the MPI tool interface.

The in-place ``allgather_into`` runs on ``MPI_Iallgather`` (non-blocking, so a deadline can
interrupt it).  For long messages MPICH runs it as a ring: ``size - 1`` steps, each waiting for
the one before.  When every rank shares one host, recursive doubling moves the same bytes in
``log2(size)`` steps, and fewer dependent steps matter where processes share cores and each step
waits for two of them to be scheduled together.  Measured on the 2-core CI box with 4 ranks and
1 MiB blocks, in alternating runs of the benchmark: ring 1.02-1.18x the raw blocking
``Allgather`` (median 1.04 in runs where an op took ~2 ms, 1.15 where it took ~0.7 ms),
recursive doubling 0.75-1.01x and 0.95-1.25x (medians 0.91 and 1.08).  16 MiB was level.
Across hosts MPICH's own choice stands: there the ring's neighbour-only traffic is the reason
it is the default.

The choice is MPICH's control variable ``MPIR_CVAR_IALLGATHER_INTRA_ALGORITHM``.  Setting it in
the environment would be read only at ``MPI_Init``, before the world's shape is known, and an
unknown value aborts ``MPI_Init`` (names changed between MPICH releases).  So it is written at
run time through ``MPI_T``, which mpi4py does not wrap; the calls go through ctypes into the MPI
library mpi4py loaded.  The variable is process-wide (the caller's own mpi4py ``Iallgather``
sees it too) and MPICH expects every rank to hold the same value, so the ranks agree before and
after writing and put it back unless all of them succeeded.  Anything unexpected (not MPICH, a
missing symbol, an unknown name, a user who set the variable) leaves MPICH's default alone.
``COMFY_CLUSTER_MPI_TUNING=0`` turns this off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)

ENV = "COMFY_CLUSTER_MPI_TUNING"
IALLGATHER = "MPIR_CVAR_IALLGATHER_INTRA_ALGORITHM"
RECURSIVE_DOUBLING = "sched_recursive_doubling"
_DEFAULT = "auto"
_SUCCESS = 0
# MPICH lists an enum variable's values one per line of its description, in the order of their
# numbers ("auto - Internal algorithm selection ...", "sched_ring   - Force ring algorithm").
_VALUE_LINE = re.compile(r"^(\w+)\s+- ", re.MULTILINE)
_DESC_BYTES = 8192


def tune(mpi: Any, world: Any) -> dict[str, str]:
    """Choose MPICH's iallgather algorithm for ``world``; the variables set, by name.

    Collective over ``world`` (an intracommunicator of every rank): every rank calls it, once,
    before its first collective.  What decides whether a rank takes part is the same on every
    rank (the world's size); what a rank wants may differ (an environment set for one rank), so
    they agree before anything is written.
    """
    size = world.Get_size()
    if size < 4 or size & (size - 1):  # 2 ranks: one exchange either way; not a power of two
        return {}
    wanted = _one_host(mpi, world) and _allowed(mpi)
    writer = _CvarWriter.open(mpi, IALLGATHER) if wanted else None
    # Ours from an earlier world of this process counts as the default.
    ready = writer is not None and writer.current() in (_DEFAULT, RECURSIVE_DOUBLING)
    if not _all(mpi, world, ready):
        if writer is not None:
            writer.close()
        return {}
    assert writer is not None
    try:
        if not _all(mpi, world, writer.write(RECURSIVE_DOUBLING)):
            writer.write(_DEFAULT)
            return {}
        log.debug("mpi: %s=%s (one host, %d ranks)", IALLGATHER, RECURSIVE_DOUBLING, size)
        return {IALLGATHER: RECURSIVE_DOUBLING}
    finally:
        writer.close()


def _one_host(mpi: Any, world: Any) -> bool:
    node = world.Split_type(mpi.COMM_TYPE_SHARED)
    try:
        return bool(node.Get_size() == world.Get_size())
    finally:
        node.Free()


def _allowed(mpi: Any) -> bool:
    if os.environ.get(ENV, "1") == "0" or IALLGATHER in os.environ:
        return False  # turned off, or the user chose an algorithm
    # Open MPI, or a derivative whose variables may differ, keeps its own choice.
    return bool(mpi.Get_library_version().lstrip().startswith("MPICH Version:"))


def _all(mpi: Any, world: Any, flag: bool) -> bool:
    return bool(world.allreduce(1 if flag else 0, op=mpi.MIN))


class _CvarWriter:
    """One MPICH control variable of enum type, open for reading and writing through MPI_T."""

    def __init__(self, lib: Any, handle: ctypes.c_void_p, values: list[str]) -> None:
        self._lib = lib
        self._handle = handle
        self._values = values

    @classmethod
    def open(cls, mpi: Any, name: str) -> _CvarWriter | None:
        try:
            lib = ctypes.CDLL(mpi.__file__)  # resolves through the MPI library mpi4py loaded
            provided = ctypes.c_int()
            if lib.MPI_T_init_thread(mpi.THREAD_MULTIPLE, ctypes.byref(provided)) != _SUCCESS:
                return None
        except (OSError, AttributeError) as err:
            log.debug("mpi: no MPI_T (%s); MPICH's default algorithms stand", err)
            return None
        writer = None
        try:
            writer = cls._open(lib, mpi, name)
        except AttributeError as err:  # a symbol missing from this MPI, or an older mpi4py
            log.debug("mpi: MPI_T incomplete (%s); MPICH's default algorithms stand", err)
        if writer is None:
            lib.MPI_T_finalize()
        return writer

    @classmethod
    def _open(cls, lib: Any, mpi: Any, name: str) -> _CvarWriter | None:
        index = ctypes.c_int()
        if lib.MPI_T_cvar_get_index(name.encode(), ctypes.byref(index)) != _SUCCESS:
            return None
        name_buf = ctypes.create_string_buffer(256)
        name_len = ctypes.c_int(len(name_buf))
        desc = ctypes.create_string_buffer(_DESC_BYTES)
        desc_len = ctypes.c_int(_DESC_BYTES)
        verbosity, bind, scope = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        datatype = ctypes.c_int64()  # an int handle in MPICH's ABI, a pointer in the standard one
        enumtype = ctypes.c_void_p()
        rc = lib.MPI_T_cvar_get_info(
            index,
            name_buf,
            ctypes.byref(name_len),
            ctypes.byref(verbosity),
            ctypes.byref(datatype),
            ctypes.byref(enumtype),
            desc,
            ctypes.byref(desc_len),
            ctypes.byref(bind),
            ctypes.byref(scope),
        )
        if rc != _SUCCESS or datatype.value != mpi._handleof(mpi.INT):
            return None
        values = _VALUE_LINE.findall(desc.value.decode(errors="replace"))
        if _DEFAULT not in values or RECURSIVE_DOUBLING not in values:
            return None
        handle, count = ctypes.c_void_p(), ctypes.c_int()
        if lib.MPI_T_cvar_handle_alloc(index, None, ctypes.byref(handle), ctypes.byref(count)):
            return None
        if count.value != 1:
            lib.MPI_T_cvar_handle_free(ctypes.byref(handle))
            return None
        return cls(lib, handle, values)

    def current(self) -> str | None:
        value = ctypes.c_int(-1)
        if self._lib.MPI_T_cvar_read(self._handle, ctypes.byref(value)) != _SUCCESS:
            return None
        return self._values[value.value] if 0 <= value.value < len(self._values) else None

    def write(self, name: str) -> bool:
        value = ctypes.c_int(self._values.index(name))
        if self._lib.MPI_T_cvar_write(self._handle, ctypes.byref(value)) != _SUCCESS:
            return False
        return self.current() == name

    def close(self) -> None:
        self._lib.MPI_T_cvar_handle_free(ctypes.byref(self._handle))
        self._lib.MPI_T_finalize()
