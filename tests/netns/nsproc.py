"""Running things inside network namespaces: setup commands, sockets, captured processes.

The parts of the NAT test topologies (topology.py) that know nothing of NATs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence

COMMAND_TIMEOUT_S = 20.0
_CLONE_NEWNET = 0x40000000


class TopologyError(RuntimeError):
    """A namespace, link or firewall rule could not be set up (the failing command is named)."""


def sh(argv: Sequence[str], *, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a setup command; raise TopologyError naming it (and its stderr) when it fails."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopologyError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise TopologyError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def socket_in(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM
) -> socket.socket:
    """A socket of namespace `ns`, made in this process (a socket keeps the namespace it was
    made in, and setns() moves only the calling thread, so a short-lived thread makes it)."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=enter_and_make, name=f"setns-{ns}")
    thread.start()
    thread.join(COMMAND_TIMEOUT_S)
    if failed or not made:
        raise TopologyError(f"cannot make a socket in namespace {ns}: {failed}")
    return made[0]


class NsProcess:
    """A program running in a namespace, its stdout and stderr collected by reader threads (so a
    chatty program never blocks on a full pipe)."""

    def __init__(self, popen: subprocess.Popen[str], name: str) -> None:
        self.popen = popen
        self.name = name
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(stream, key), daemon=True, name=name)
            for stream, key in ((popen.stdout, "stdout"), (popen.stderr, "stderr"))
            if stream is not None
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, key: str) -> None:
        assert hasattr(stream, "readline")
        for line in iter(stream.readline, ""):
            with self._changed:
                self._lines[key].append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(self._lines["stdout"])

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._lines["stderr"])

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status; TimeoutError (naming the program and its output) when it runs on."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(
                f"{self.name} still running after {timeout}s; {self.tail()}"
            ) from exc
        for reader in self._readers:
            reader.join(5.0)
        return code

    def wait_for_output(
        self, pattern: str, timeout: float = 30.0, stream: str = "stdout"
    ) -> re.Match[str]:
        """The first match of `pattern` in one line of the stream, waiting up to `timeout`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines[stream]:
                    if m := regex.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._readers_alive()):
                    raise TimeoutError(f"{self.name}: no line matching {pattern!r}; {self.tail()}")
                self._changed.wait(min(left, 0.2))

    def _readers_alive(self) -> bool:
        return any(r.is_alive() for r in self._readers)

    def tail(self, chars: int = 2000) -> str:
        return f"stdout: {self.stdout[-chars:]!r} stderr: {self.stderr[-chars:]!r}"

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM its process group, then SIGKILL after `grace` seconds."""
        if self.popen.poll() is None:
            signal_group(self.popen, "TERM")
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                signal_group(self.popen, "KILL")
                self.popen.wait(grace)
        for reader in self._readers:
            reader.join(1.0)


def signal_group(popen: subprocess.Popen[str], sig: str) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, getattr(signal, f"SIG{sig}"))
