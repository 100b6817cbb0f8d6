"""Start the ranks (``start``), or start them and see them through (``launch``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TextIO

from collectives.auth import KEY_ENV
from collectives.errors import ConfigurationError

from ._output import LinePump
from .config import (
    LaunchConfig,
    RankSlot,
    lacks_cluster_key,
    pick_free_port,
    with_cluster_key,
)
from .group import LaunchedGroup

TIMEOUT_EXIT = 124  # what coreutils' timeout(1) returns, so scripts can tell a timeout apart
# SIGHUP too: the ranks run in their own sessions, so a closed terminal or dropped ssh session
# would otherwise leave them running without the launcher.
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SLICE_S = 0.1  # how often the supervisor looks at signals and the deadline
THP_ENV = "THP_MEM_ALLOC_ENABLE"
"""torch's switch for transparent huge pages in its CPU allocator (tensors of 2 MiB and up), on
by default in the ranks (the environment's value wins).  A same-host peer copies a large message
straight out of the sender's tensor with ``process_vm_readv``, which pins every page it reads:
16 MiB out of huge pages at 15-23 GB/s, out of 4 KiB pages at 5.5-10 GB/s here (``python -m
benchmarks.cma_pages``; a 4-rank 16 MiB reduce on udp 6.2-6.3 ms against 9.1-9.3 ms).  torch
reads it once, at its first allocation, so it must be in the environment a rank starts with."""


def child_env(
    config: LaunchConfig,
    slot: RankSlot,
    master_port: int,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment one rank starts with.

    Layers, later wins: ``base`` (default: this process's environment), ``config.env``,
    ``config.per_rank_env``, then the rank variables, which are the launcher's contract with the
    ranks and must not be shadowed by accident.  ``config.cluster_key`` becomes
    ``COMFY_CLUSTER_KEY`` unless a key is set already.
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"  # a default: lines show up as printed, not at exit
    env.setdefault(THP_ENV, "1")  # see THP_ENV
    env.update(config.env)
    if config.per_rank_env is not None:
        env.update(config.per_rank_env(slot))
    if config.cluster_key is not None and lacks_cluster_key(env):
        env[KEY_ENV] = config.cluster_key
    env.update(
        RANK=str(slot.rank),
        WORLD_SIZE=str(slot.world_size),
        LOCAL_RANK=str(slot.local_rank),
        LOCAL_WORLD_SIZE=str(slot.local_world_size),
        MASTER_ADDR=config.master_addr,
        MASTER_PORT=str(master_port),
        COMFY_CLUSTER_INSTANCE_INDEX=str(slot.rank),
        COMFY_CLUSTER_INSTANCE_COUNT=str(slot.world_size),
        COMFY_CLUSTER_ROLE="LEADER" if slot.rank == 0 else "FOLLOWER",
    )
    if config.backend is not None:
        env["COMFY_CLUSTER_BACKEND"] = config.backend
    return env


def start(
    config: LaunchConfig,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> LaunchedGroup:
    """Validate ``config`` and start its ranks; the caller owns the returned group.

    With ``prefix_output``, each rank's stdout goes to ``stdout`` (default ``sys.stdout``) and its
    stderr to ``stderr`` (default: ``stdout`` when given, else ``sys.stderr``), as whole lines
    prefixed ``[rank N] ``.  Without it the ranks write straight to this process's fds 1 and 2.

    The ranks share one cluster key: the environment's, else a random one made here
    (:func:`launchers.config.with_cluster_key`), never printed.
    """
    config.validate()
    config = with_cluster_key(config)
    port = (
        config.master_port if config.master_port is not None else pick_free_port(config.master_addr)
    )
    slots = config.slots()
    commands = [_command(config, slot) for slot in slots]
    envs = [child_env(config, slot, port) for slot in slots]
    pump = LinePump() if config.prefix_output else None
    out, err = _streams(stdout, stderr)
    pipe = subprocess.PIPE if pump is not None else None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for slot, command, env in zip(slots, commands, envs, strict=True):
            proc = subprocess.Popen(
                command,
                env=env,
                cwd=config.cwd,
                stdin=subprocess.DEVNULL,  # N ranks sharing one terminal's input helps nobody
                stdout=pipe,
                stderr=pipe,
                bufsize=0,
                start_new_session=True,
            )
            procs.append(proc)
            if pump is not None:
                assert proc.stdout is not None and proc.stderr is not None
                prefix = f"[rank {slot.rank}] "
                pump.add(proc.stdout, prefix, out)
                pump.add(proc.stderr, prefix, err)
    except BaseException as exc:
        # Whatever went wrong, the ranks already started must not outlive this call.
        LaunchedGroup(
            slots[: len(procs)],
            procs,
            master_addr=config.master_addr,
            master_port=port,
            kill_grace_s=0.0,
            pump=pump,
        ).stop()
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise ConfigurationError(
                f"cannot start {command[0]!r} for rank {slot.rank}: {exc.strerror}; "
                f"check the command and PATH"
            ) from exc
        raise
    if pump is not None:
        pump.start()
    return LaunchedGroup(
        slots,
        procs,
        master_addr=config.master_addr,
        master_port=port,
        kill_grace_s=config.kill_grace_s,
        pump=pump,
    )


def launch(
    config: LaunchConfig,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the ranks to completion; return 0, the first failure's exit code, 124 on timeout, or
    128+N when signal N (SIGINT, SIGTERM, SIGHUP) stopped the launcher.

    A failure stops every other rank (SIGTERM, then SIGKILL after ``kill_grace_s``).  SIGINT,
    SIGTERM and SIGHUP sent to the launcher are forwarded to the ranks, which then get the same
    grace; a second one kills them at once.  Signals are handled only when called from the main
    thread.
    """
    received: list[int] = []
    started: list[LaunchedGroup] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for group in started:
            if len(received) > 1:
                group.kill()  # asked twice: no more grace
            else:
                group.send_signal(signum)

    # Handlers go in before the first rank starts: a Ctrl-C in between must not orphan ranks.
    with _forwarding(on_signal):
        group = start(config, stdout=stdout, stderr=stderr)
        started.append(group)
        if received:
            group.send_signal(received[0])
        try:
            return _supervise(group, config, received, _streams(stdout, stderr)[1])
        finally:
            group.stop()


def _supervise(group: LaunchedGroup, config: LaunchConfig, received: list[int], log: TextIO) -> int:
    deadline = None if config.timeout_s is None else time.monotonic() + config.timeout_s
    while not received:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            group.note(
                log, f"[launcher] timed out after {config.timeout_s:g} s; stopping all ranks"
            )
            group.stop()
            return TIMEOUT_EXIT
        result = group.wait(timeout=_SLICE_S if left is None else min(_SLICE_S, left))
        if result is not None and not received:
            if result != 0:
                group.note(
                    log,
                    f"[launcher] rank {group.failed_rank} exited with code {result}; "
                    "stopped the other ranks",
                )
            return result
    name = signal.Signals(received[0]).name
    group.note(log, f"[launcher] got {name}; stopping all ranks (send it again to kill at once)")
    group.stop(signum=None)  # already forwarded
    return 128 + received[0]


def _streams(stdout: TextIO | None, stderr: TextIO | None) -> tuple[TextIO, TextIO]:
    """One stream given for stdout captures everything; none given means this process's own."""
    if stdout is None:
        return sys.stdout, stderr if stderr is not None else sys.stderr
    return stdout, stderr if stderr is not None else stdout


def _command(config: LaunchConfig, slot: RankSlot) -> list[str]:
    if config.per_rank_command is None:
        return list(config.command)
    command = list(config.per_rank_command(slot))
    if not command:
        raise ConfigurationError(f"per_rank_command returned an empty command for rank {slot.rank}")
    return command


@contextlib.contextmanager
def _forwarding(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Install ``handler`` for the forwarded signals while launching, from the main thread only.

    A signal this process ignores stays ignored: under ``nohup`` (SIGHUP) or as a background job
    of a script (SIGINT) the caller asked for exactly that.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; the caller handles signals itself
        return
    previous = {
        signum: signal.signal(signum, handler)
        for signum in _FORWARDED
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


__all__ = ["TIMEOUT_EXIT", "child_env", "launch", "start"]
