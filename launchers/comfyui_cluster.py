"""The running ComfyUI servers of one node: :class:`ComfyCluster`.

It waits for readiness, kills and restarts single ranks (for fault tests) and stops everything;
:func:`launchers.comfyui_start.start_comfy_cluster` creates it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TextIO

from ._output import LinePump
from .comfyui_config import ComfyClusterConfig
from .comfyui_http import OPENER
from .config import RankSlot
from .group import LaunchedGroup

_POLL_S = 0.25  # readiness / liveness polling interval
_HTTP_TIMEOUT_S = 2.0
_REAP_S = 10.0  # after SIGKILL, how long to wait for a rank to be reaped


@dataclass
class _Rank:
    """One rank's fixed launch recipe and the process currently running it."""

    slot: RankSlot
    port: int
    url: str
    command: list[str]
    env: dict[str, str]
    group: LaunchedGroup
    index: int  # position of the process in ``group``
    stopped: bool = False  # stopped on purpose (kill_rank/stop_rank): not a failure


class RankExitedError(RuntimeError):
    """A rank's server exited when it should be running."""

    def __init__(self, rank: int, code: int) -> None:
        super().__init__(f"ComfyUI rank {rank} exited with code {code}")
        self.rank = rank
        self.code = code


class ComfyCluster:
    """The ComfyUI servers started by :func:`start_comfy_cluster` on this node.

    Nothing here stops the other ranks when one fails (tests kill ranks on purpose); the
    ``comfyui`` command does that with :meth:`poll`.  Ranks are global ranks; on a single node
    they are 0..N-1.  Use as a context manager, or call :meth:`stop`.
    """

    def __init__(
        self,
        config: ComfyClusterConfig,
        ranks: list[_Rank],
        *,
        leader_url: str,
        base_directory: Path,
        temporary_base: bool,
        streams: tuple[TextIO, TextIO],
        master_port: int,
    ) -> None:
        self.config = config
        self.leader_url = leader_url
        self.base_directory = base_directory
        self.master_port = master_port
        self._ranks = {r.slot.rank: r for r in ranks}
        self._temporary_base = temporary_base
        self._streams = streams
        self._groups = [ranks[0].group]
        self._stopped = False

    # --- what is running -----------------------------------------------------------------------

    @property
    def ranks(self) -> list[int]:
        return list(self._ranks)

    @property
    def urls(self) -> list[str]:
        """Each rank's base URL (``http://host:port``, no trailing slash), in rank order."""
        return [r.url for r in self._ranks.values()]

    @property
    def ports(self) -> list[int]:
        return [r.port for r in self._ranks.values()]

    def url(self, rank: int) -> str:
        return self._rank(rank).url

    def pid(self, rank: int) -> int:
        """Process id of the rank's current server (also its process group id)."""
        rec = self._rank(rank)
        return rec.group.pids[rec.index]

    def exit_code(self, rank: int) -> int | None:
        """The current server's exit status (128+N for signal N), None while it runs."""
        rec = self._rank(rank)
        return rec.group.returncodes.get(rec.slot.rank)

    def is_running(self, rank: int) -> bool:
        return self.exit_code(rank) is None

    def poll(self) -> RankExitedError | None:
        """The first rank found exited although nobody stopped it, else None."""
        for rec in self._ranks.values():
            if rec.stopped:
                continue
            code = rec.group.returncodes.get(rec.slot.rank)
            if code is not None:
                return RankExitedError(rec.slot.rank, code)
        return None

    def wait(self, timeout: float | None = None) -> RankExitedError | None:
        """Block until a rank exits unexpectedly (returned), or ``timeout`` runs out (None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (failure := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic()))
        return failure

    # --- readiness -----------------------------------------------------------------------------

    def is_ready(self, rank: int) -> bool:
        """Whether the rank answers ``GET /system_stats`` with HTTP 200 right now."""
        return _answers(self._rank(rank).url + "/system_stats")

    def wait_ready(
        self,
        timeout: float | None = None,
        ranks: Sequence[int] | None = None,
        *,
        log: TextIO | None = None,
    ) -> float:
        """Wait until every rank (or ``ranks``) answers ``/system_stats``; returns seconds waited.

        With ``log``, one line per rank as it becomes ready.  Raises :class:`RankExitedError`
        when a rank exits first (or was stopped on purpose and not restarted), and
        :class:`TimeoutError` naming the late ranks after ``timeout`` (default: the config's
        ``ready_timeout_s``).
        """
        limit = self.config.ready_timeout_s if timeout is None else timeout
        began = time.monotonic()
        waiting = list(self._ranks if ranks is None else ranks)
        for rank in waiting:
            self._rank(rank)  # unknown ranks fail now, not after the timeout
        while True:
            self._ready_pass(waiting, began, log)
            if not waiting:
                return time.monotonic() - began
            if time.monotonic() - began >= limit:
                raise TimeoutError(
                    f"ComfyUI rank(s) {', '.join(map(str, waiting))} did not answer "
                    f"/system_stats within {limit:g} s: see their output; raise --ready-timeout "
                    "if start-up is just slow"
                )
            time.sleep(_POLL_S)

    def _ready_pass(self, waiting: list[int], began: float, log: TextIO | None) -> None:
        """Ask every rank in ``waiting`` once; remove (and log) those that answer."""
        for rank in list(waiting):
            rec = self._ranks[rank]
            code = rec.group.returncodes.get(rank)
            if code is not None:
                raise RankExitedError(rank, code)
            if _answers(rec.url + "/system_stats"):
                waiting.remove(rank)
                if log is not None:
                    self._note(
                        log,
                        f"[launcher] rank {rank} ready at {rec.url}/ "
                        f"({time.monotonic() - began:.1f} s)",
                    )

    # --- fault injection and restarts ------------------------------------------------------------

    def kill_rank(self, rank: int, signum: int = signal.SIGKILL) -> int:
        """Kill one rank's server (default SIGKILL, like a crash); returns its exit status.

        The rank counts as stopped on purpose: :meth:`poll` does not report it.
        """
        rec = self._rank(rank)
        rec.stopped = True
        pid = rec.group.pids[rec.index]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)
        code = self._await_exit(rec, _REAP_S)
        if code is None and signum != signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            code = self._await_exit(rec, _REAP_S)
        if code is None:
            raise RuntimeError(f"ComfyUI rank {rank} (pid {pid}) did not exit after SIGKILL")
        return code

    def stop_rank(self, rank: int) -> int:
        """Stop one rank gracefully (SIGTERM, then SIGKILL after ``kill_grace_s``)."""
        rec = self._rank(rank)
        rec.stopped = True
        if (code := rec.group.returncodes.get(rank)) is not None:
            return code
        pid = rec.group.pids[rec.index]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        code = self._await_exit(rec, self.config.kill_grace_s)
        return code if code is not None else self.kill_rank(rank)

    def restart_rank(self, rank: int) -> int:
        """Stop the rank if it runs, start it again with the same command, env and port.

        Returns the new process id; :meth:`wait_ready` (``ranks=[rank]``) waits for it.
        """
        self._check_running()
        rec = self._rank(rank)
        self.stop_rank(rank)
        out, err = self._streams
        pump = LinePump() if self.config.prefix_output else None
        pipe = subprocess.PIPE if pump is not None else None
        proc = subprocess.Popen(
            rec.command,
            env=rec.env,
            stdin=subprocess.DEVNULL,
            stdout=pipe,
            stderr=pipe,
            bufsize=0,
            start_new_session=True,  # its own process group, like start() gives every rank
        )
        if pump is not None:
            assert proc.stdout is not None and proc.stderr is not None
            pump.add(proc.stdout, f"[rank {rank}] ", out)
            pump.add(proc.stderr, f"[rank {rank}] ", err)
            pump.start()
        group = LaunchedGroup(
            [rec.slot],
            [proc],
            master_addr=self.config.master_addr,
            master_port=self.master_port,
            kill_grace_s=self.config.kill_grace_s,
            pump=pump,
        )
        self._groups.append(group)
        rec.group, rec.index, rec.stopped = group, 0, False
        return proc.pid

    # --- shutdown ------------------------------------------------------------------------------

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every rank (``signum``, SIGKILL after ``kill_grace_s``); safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        for rec in self._ranks.values():
            rec.stopped = True
        # Signal every group first so the grace periods run at the same time, not one by one.
        for group in self._groups:
            group.send_signal(signum)
        for group in self._groups:
            group.stop(signum=None)
        if self._temporary_base:
            shutil.rmtree(self.base_directory, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL every rank now (a second Ctrl-C); :meth:`stop` still reaps them."""
        for group in self._groups:
            group.kill()

    def __enter__(self) -> ComfyCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- internals -----------------------------------------------------------------------------

    def _rank(self, rank: int) -> _Rank:
        try:
            return self._ranks[rank]
        except KeyError:
            raise ValueError(
                f"rank {rank} is not run by this launcher (it runs {self.ranks})"
            ) from None

    def _check_running(self) -> None:
        if self._stopped:
            raise RuntimeError("the ComfyUI cluster was stopped; start a new one")

    def _await_exit(self, rec: _Rank, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while (code := rec.group.returncodes.get(rec.slot.rank)) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        return code

    def _note(self, out: TextIO, line: str) -> None:
        self._groups[0].note(out, line)


def _answers(url: str) -> bool:
    try:
        with OPENER.open(url, timeout=_HTTP_TIMEOUT_S) as response:
            status: int = response.status
            response.read()
            return status == 200
    except (OSError, ValueError):  # refused, reset, timed out, HTTP error (URLError is OSError)
        return False


__all__ = ["ComfyCluster", "RankExitedError"]
