"""Cross-memory attach against a real second process (no fakes: the kernel does the reading)."""

from __future__ import annotations

import ctypes
import errno
import subprocess
import sys

import pytest

from collectives.backends import cma

pytestmark = pytest.mark.skipif(not cma.enabled(), reason="no process_vm_readv on this platform")

_CHILD = """
import ctypes, sys
from collectives.backends import cma
probe = cma.Probe()
data = ctypes.create_string_buffer(bytes(range(256)) * 4096)  # 1 MiB
sys.stdout.write(probe.descriptor().hex() + " " + str(ctypes.addressof(data)) + "\\n")
sys.stdout.flush()
sys.stdin.readline()
"""


def _child() -> tuple[subprocess.Popen[str], bytes, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    desc, address = proc.stdout.readline().split()
    return proc, bytes.fromhex(desc), int(address)


def test_a_process_of_this_host_is_read_exactly_and_a_dead_one_is_esrch() -> None:
    proc, desc, address = _child()
    try:
        assert cma.can_read(desc)
        pid = int.from_bytes(desc[16:20], "little")
        out = ctypes.create_string_buffer(1 << 20)
        cma.read(pid, address, ctypes.addressof(out), 1 << 20)
        assert out.raw == bytes(range(256)) * 4096
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(OSError) as err:
        cma.read(pid, address, ctypes.addressof(out), 16)
    assert err.value.errno == errno.ESRCH


def test_descriptors_of_other_hosts_or_garbage_are_never_tried() -> None:
    proc, desc, _ = _child()
    try:
        assert not cma.can_read(bytes(16) + desc[16:])  # another host identity
        assert not cma.can_read(desc[:-1] + bytes([desc[-1] ^ 1]))  # a token that does not match
        assert not cma.can_read(cma.no_descriptor())
        assert not cma.can_read(b"short")
    finally:
        proc.kill()
        proc.wait()


def test_it_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cma.ENV, "0")
    assert not cma.enabled()
