"""Unit tests of the mpi backend's modules that need no MPI world: the object envelope's layout,
and that importing the backend does not initialise MPI (mpiexec scenarios: test_mpi_unit.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_object_envelope_leads_with_the_shared_envelope() -> None:
    """The 512-byte object envelope: the library's envelope, then this transport's extras."""
    from collectives.backends.envelope import Envelope
    from collectives.backends.mpi_objects import (
        ENV_SIZE,
        INLINE_CAPACITY,
        pack_envelope,
        parse_envelope,
    )
    from collectives.codec import CodecOptions, encode, header_limit
    from collectives.errors import CollectiveMismatchError, RemoteProtocolError

    env = Envelope("gather", 9, 2, comm=0xABC, epoch=3)
    header = encode({"a": 1}).header
    data = pack_envelope(env, header, payload_tag=77)
    assert len(data) == ENV_SIZE and Envelope.unpack_from(data) == env
    got = parse_envelope(data, src=1)
    assert (got.env, got.header, got.header_len, got.payload_tag) == (env, header, len(header), 77)
    long = parse_envelope(pack_envelope(env, bytes(INLINE_CAPACITY + 16)), src=1)
    assert long.header is None and long.header_len == INLINE_CAPACITY + 16  # follows on its own
    with pytest.raises(CollectiveMismatchError, match="root 1"):
        env._replace(root=1).expect(got.env, rank=0, src=1)
    with pytest.raises(RemoteProtocolError):
        parse_envelope(bytes(ENV_SIZE), src=1)  # not an envelope (another op's bytes)
    assert header_limit(CodecOptions(max_buffers=10)) < header_limit(CodecOptions()) < 2 << 20


def test_import_does_not_initialise_mpi() -> None:
    code = (
        "import sys, collectives\n"
        "from collectives.backends.mpi import MPIBackend\n"
        "assert 'mpi4py.MPI' not in sys.modules\n"
        "assert MPIBackend.name == 'mpi'\n"
        "assert 'pip install mpi4py mpich' in MPIBackend.unavailable_reason()\n"
        "print(MPIBackend.is_available())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
