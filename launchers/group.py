"""A started set of ranks: wait for them, fail fast, stop the whole process tree.

Each rank runs in its own session (so its own process group): a signal to the group reaches the
rank and everything it spawned, and a Ctrl-C at the terminal reaches only the launcher, which
decides what the ranks get.

One reaper thread per rank blocks in ``waitpid`` for that rank alone, so exits are seen in the
order they happen (the first failure is the one reported, not the lowest rank that failed within a
polling interval) and no other child of this process is reaped by mistake.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from types import TracebackType
from typing import TextIO

from ._output import LinePump
from .config import RankSlot

_SLICE_S = 0.05  # how often waits look up from the exit queue (signals are handled in between)
_REAP_S = 5.0  # after SIGKILL, how long to wait for the kernel to finish a rank off


def exit_code(returncode: int) -> int:
    """A shell-style exit status: killed by signal N reads as 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class LaunchedGroup:
    """The ranks one launcher started on this node.

    ``wait`` returns the group's result: the first failing rank's exit code (after stopping the
    others), or 0 once every rank exited 0.  ``stop`` ends everything and is safe to call twice.
    """

    def __init__(
        self,
        slots: list[RankSlot],
        procs: list[subprocess.Popen[bytes]],
        *,
        master_addr: str,
        master_port: int,
        kill_grace_s: float,
        pump: LinePump | None,
    ) -> None:
        self.slots = slots
        self.master_addr = master_addr
        self.master_port = master_port
        self.kill_grace_s = kill_grace_s
        self._procs = procs
        self._pump = pump
        self._codes: dict[int, int] = {}  # index -> exit code, filled in exit order
        self._exits: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._first_failure: int | None = None  # index
        self._stopped = False
        self._reapers = [
            threading.Thread(
                target=self._reap, args=(i, p), name=f"launchers-reap-{i}", daemon=True
            )
            for i, p in enumerate(procs)
        ]
        for reaper in self._reapers:
            reaper.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def ranks(self) -> list[int]:
        return [s.rank for s in self.slots]

    @property
    def returncodes(self) -> dict[int, int]:
        """Exit codes (shell-style) of the ranks that have exited so far, by global rank."""
        self._drain()
        return {self.slots[i].rank: code for i, code in self._codes.items()}

    @property
    def failed_rank(self) -> int | None:
        """The global rank that failed first, if any did."""
        self._drain()
        return None if self._first_failure is None else self.slots[self._first_failure].rank

    def poll(self) -> int | None:
        """The group's result if it is decided, else None.  Does not stop anything."""
        self._drain()
        if self._first_failure is not None:
            return self._codes[self._first_failure]
        return 0 if len(self._codes) == len(self._procs) else None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the result (stopping the rest on a failure); None if ``timeout`` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (result := self.poll()) is None:
            left = _SLICE_S if deadline is None else min(_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                return None
            self._drain(left)
        self.stop()
        return result

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to every running rank's whole process tree."""
        for index, proc in enumerate(self._procs):
            if index not in self._codes:
                _signal_group(proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL every rank's process tree now (no grace); ``stop`` or ``wait`` still reap."""
        for proc in self._procs:
            _signal_group(proc.pid, signal.SIGKILL)

    def stop(self, signum: int | None = signal.SIGTERM) -> None:
        """Send ``signum`` (None: it was already sent), allow ``kill_grace_s``, then SIGKILL.

        Returns with every rank reaped and the output copied (or after a bounded wait when the
        kernel will not let a process die).
        """
        if self._stopped:
            return
        if signum is not None:
            # Exited ranks too: processes they left behind still hold their group.
            for proc in self._procs:
                _signal_group(proc.pid, signum)
        deadline = time.monotonic() + self.kill_grace_s
        while self._any_alive() and (left := deadline - time.monotonic()) > 0:
            self._drain(min(_SLICE_S, left))
        if self._any_alive():
            self.kill()
        reap_deadline = time.monotonic() + _REAP_S
        for reaper in self._reapers:
            reaper.join(max(0.0, reap_deadline - time.monotonic()))
        self._drain()
        if self._pump is not None:
            self._pump.close()
        self._stopped = True

    def note(self, out: TextIO, line: str) -> None:
        """Write a launcher message as one line, never in the middle of a rank's line."""
        if self._pump is not None:
            self._pump.write_line(out, line)
            return
        with contextlib.suppress(OSError, ValueError):
            out.write(line + "\n")
            out.flush()

    def __enter__(self) -> LaunchedGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _reap(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        self._exits.put((index, exit_code(proc.wait())))

    def _drain(self, timeout: float = 0.0) -> None:
        """Record exits from the reapers, waiting up to ``timeout`` for the first one."""
        try:
            item = self._exits.get(timeout=timeout) if timeout > 0 else self._exits.get_nowait()
            while True:
                index, code = item
                self._codes[index] = code
                if code != 0 and self._first_failure is None:
                    self._first_failure = index
                item = self._exits.get_nowait()
        except queue.Empty:
            pass

    def _any_alive(self) -> bool:
        self._drain()
        if len(self._codes) < len(self._procs):
            return True
        return bool(_live_groups(self.pids))


def _signal_group(pgid: int, signum: int) -> None:
    # ProcessLookupError: the group is gone.  PermissionError: a member changed user (setuid);
    # nothing this process may do about it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _live_groups(pgids: list[int]) -> set[int]:
    """Those of ``pgids`` that still have a running (not zombie) member.

    An orphaned grandchild that died stays a zombie in its group until init reaps it, and in a
    container init may never do so: ``killpg(pgid, 0)`` would then call the group alive forever.
    /proc tells zombies apart; without it, fall back to ``killpg``.
    """
    wanted = set(pgids)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {pgid for pgid in wanted if _group_signalable(pgid)}
    live: set[int] = set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) in wanted and fields[0] not in (b"Z", b"X"):
            live.add(int(fields[2]))
    return live


def _group_signalable(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
