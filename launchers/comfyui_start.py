"""Starting the ComfyUI servers of one node: :func:`start_comfy_cluster`.

It checks the configuration (python, ComfyUI, node pack, ports, GPUs) before anything starts,
prepares the shared base directory, then starts rank ``i`` with :data:`RUNNER` on port ``P + i``
through :func:`launchers.launch.start`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from collectives.errors import ConfigurationError

from .comfyui_base import check_writable, default_node_pack, is_node_pack, prepare_base
from .comfyui_cluster import ComfyCluster, _Rank
from .comfyui_config import MALLOC_TUNING, ComfyClusterConfig, default_python
from .comfyui_run import (
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
from .config import (
    LaunchConfig,
    RankSlot,
    pick_free_port,
    port_in_use,
    with_cluster_key,
)
from .launch import child_env, start

RUNNER = Path(__file__).with_name("comfyui_run.py")
_PROBE_TIMEOUT_S = 60.0


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
    runs_leader = 0 in config.ranks if config.ranks is not None else config.rank_offset == 0
    leader_host = host if runs_leader else config.master_addr
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
        if config.per_rank_env is not None:
            env.update(config.per_rank_env(slot))
        gpu = gpu_of(slot)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if config.malloc_tuning:
            for name, value in MALLOC_TUNING.items():
                if name not in os.environ and name not in config.env:
                    env[name] = value
        return env

    commands: dict[int, list[str]] = {}

    def rank_command(slot: RankSlot) -> list[str]:
        if slot.rank not in commands:  # creates the rank's directories: once
            commands[slot.rank] = comfy_command(
                config, python=python, base=base, slot=slot, port=port_of(slot), gpu=gpu_of(slot)
            )
        return commands[slot.rank]

    # One key for start() and restart_rank() alike (made here unless the environment has one).
    launch_config = with_cluster_key(
        LaunchConfig(
            nproc=config.nproc,
            command=[python, str(RUNNER)],
            backend=config.backend,
            master_addr=config.master_addr,
            master_port=master_port,
            rank_offset=config.rank_offset,
            world_size=config.world_size,
            ranks=config.ranks,
            env=dict(config.env),
            prefix_output=config.prefix_output,
            kill_grace_s=config.kill_grace_s,
            per_rank_env=rank_env,
            per_rank_command=rank_command,
        )
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


__all__ = ["RUNNER", "comfy_command", "start_comfy_cluster"]
