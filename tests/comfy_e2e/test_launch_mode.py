"""``comfycluster-launch comfyui`` on real ComfyUI servers (CPU, tiny random-weight models).

Two clusters start together once for the module: one rank through the command line (as a user
runs it), two ranks through the API (``start_comfy_cluster``, for kill/restart).  Multi-rank
tests check processes, ports and node registration only; running one workflow over several ranks
is the server integration's business and is tested with it.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import comfy_nodes
from collectives.errors import ConfigurationError
from comfyui_cluster.launchers.comfyui import (
    ComfyCluster,
    ComfyClusterConfig,
    hoist_subcommand,
    start_comfy_cluster,
)
from comfyui_cluster.launchers.comfyui import main as comfyui_main
from comfyui_cluster.launchers.comfyui_config import MALLOC_TUNING
from comfyui_cluster.launchers.comfyui_run import (
    RunError,
    RunOptions,
    parse_run_args,
    plan_comfy_args,
)
from tests.comfy_e2e.comfy_client import ComfyClient
from tests.comfy_e2e.conftest import (
    TEST_NODES,
    ComfyEnv,
    free_port_range,
    launcher_command,
    make_base,
    tail,
    wait_for_line,
)

pytestmark = pytest.mark.comfy

READY_TIMEOUT_S = 180.0  # generous: CI machines with 2 busy cores start ComfyUI in 8-30 s
TEST_NODE_NAMES = ("ZeroConditioning", "SleepPerImage")


@dataclass
class CliCluster:
    """A cluster run by the ``comfycluster-launch comfyui`` command in a subprocess."""

    proc: subprocess.Popen[bytes]
    log: Path
    base: Path
    urls: list[str]


@dataclass
class Clusters:
    one: CliCluster  # 1 rank, command line
    two: ComfyCluster  # 2 ranks, API
    two_log: Path


def _start_cli(env: ComfyEnv, root: Path, nproc: int) -> CliCluster:
    base = make_base(root / "base", env.models)
    port = free_port_range(nproc)
    log = root / "launcher.log"
    args = [
        "comfyui", "--nproc", str(nproc), "--port", str(port), "--base-directory", str(base),
        "--python", env.python, "--extra-custom-nodes", str(TEST_NODES),
        "--ready-timeout", str(READY_TIMEOUT_S),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            launcher_command(*args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a signal for it must not reach pytest
        )
    urls = [f"http://127.0.0.1:{port + i}" for i in range(nproc)]
    return CliCluster(proc, log, base, urls)


def _stop_cli(cluster: CliCluster) -> None:
    if cluster.proc.poll() is None:
        cluster.proc.send_signal(signal.SIGINT)
        try:
            cluster.proc.wait(30)
        except subprocess.TimeoutExpired:
            cluster.proc.kill()
            cluster.proc.wait()


@pytest.fixture(scope="module")
def clusters(comfy_env: ComfyEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    root = tmp_path_factory.mktemp("launch-mode")
    one = _start_cli(comfy_env, root / "one", 1)
    two_log = root / "two.log"
    config = ComfyClusterConfig(
        nproc=2,
        port=free_port_range(2),
        base_directory=str(make_base(root / "two", comfy_env.models)),
        python=comfy_env.python,
        extra_custom_nodes=[str(TEST_NODES)],
        ready_timeout_s=READY_TIMEOUT_S,
    )
    with two_log.open("w", buffering=1) as log:
        two = start_comfy_cluster(config, stdout=log)
        try:
            wait_for_line(one.log, ["cluster ready:"], one.proc, READY_TIMEOUT_S)
            try:
                two.wait_ready()
            except Exception as exc:
                raise AssertionError(f"2-rank cluster not ready: {exc}\n{tail(two_log)}") from exc
            yield Clusters(one, two, two_log)
        finally:
            two.stop()
            _stop_cli(one)


def _all_urls(clusters: Clusters) -> list[str]:
    return [*clusters.one.urls, *clusters.two.urls]


# --- (a) processes, ports, node registration ---------------------------------------------------


def test_every_rank_answers_system_stats(clusters: Clusters, comfy_env: ComfyEnv) -> None:
    ports = clusters.two.ports
    assert ports[1] == ports[0] + 1  # consecutive ports from --port
    assert clusters.two.leader_url == clusters.two.urls[0]
    for url in _all_urls(clusters):
        stats = ComfyClient(url).system_stats()
        assert stats["system"]["comfyui_version"] == comfy_env.version, url
        assert stats["devices"], url


def test_cli_reports_each_rank_and_the_leader(clusters: Clusters) -> None:
    text = clusters.one.log.read_text(errors="replace")
    url = clusters.one.urls[0]
    assert f"[launcher] rank 0 ready at {url}/" in text, tail(clusters.one.log)
    assert f"cluster ready: leader {url}/ (1 ranks) in " in text
    assert "[rank 0] " in text  # server output is prefixed


def test_object_info_lists_every_cluster_node_and_the_test_nodes(clusters: Clusters) -> None:
    expected = sorted(comfy_nodes.NODE_CLASS_MAPPINGS)
    assert len(expected) >= 25
    assert all(name.startswith("Cluster") for name in expected)
    for url in _all_urls(clusters):
        info = ComfyClient(url).object_info()
        missing = [n for n in [*expected, *TEST_NODE_NAMES] if n not in info]
        assert not missing, f"{url} lacks {missing}"
        assert info["SleepPerImage"]["category"] == "cluster_test"


def test_ranks_have_their_own_state_directories(clusters: Clusters) -> None:
    base = clusters.two.base_directory
    for rank in (0, 1):
        for name in ("output", "temp", "user"):
            assert (base / f"rank{rank}" / name).is_dir()
    linked = base / "custom_nodes" / "ComfyUI_Cluster"
    assert linked.resolve() == Path(comfy_nodes.__file__).resolve().parents[1]


def test_ranks_get_the_malloc_tuning(clusters: Clusters) -> None:
    for url in clusters.two.urls:
        raw = Path(f"/proc/{_server_pid(url)}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)
        for name, value in MALLOC_TUNING.items():
            assert env.get(name) == value, (url, name, env.get(name))


# --- (b) a real workflow on one rank: the cluster nodes are identities ---------------------------


def _workflow(*, cluster_nodes: bool, prefix: str) -> dict[str, dict[str, Any]]:
    latent: list[Any] = ["10", 0] if cluster_nodes else ["3", 0]
    decoded: list[Any] = ["11", 0] if cluster_nodes else ["6", 0]
    wf: dict[str, dict[str, Any]] = {
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": "tiny_sd15_unet.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "ZeroConditioning", "inputs": {"tokens": 77, "width": 768}},
        "3": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 8}},
        "4": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": 42, "steps": 4, "cfg": 2.0,
                         "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                         "negative": ["2", 0], "latent_image": latent, "denoise": 1.0}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": decoded, "filename_prefix": prefix}},
    }  # fmt: skip
    if cluster_nodes:
        wf["10"] = {"class_type": "ClusterFanOutLatent", "inputs": {"samples": ["3", 0]}}
        wf["11"] = {"class_type": "ClusterFanInImages", "inputs": {"images": ["6", 0]}}
    return wf


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_one_rank_workflow_with_cluster_nodes_matches_plain_run(clusters: Clusters) -> None:
    client = ComfyClient(clusters.one.urls[0])
    try:
        plain = client.images(client.run(_workflow(cluster_nodes=False, prefix="plain/img")), "7")
        spread = client.images(client.run(_workflow(cluster_nodes=True, prefix="cluster/img")), "7")
    except Exception as exc:
        raise AssertionError(f"{exc}\n{tail(clusters.one.log)}") from exc
    assert len(plain) == 8 and len(spread) == 8
    for i, (a, b) in enumerate(zip(plain, spread, strict=True)):
        pa, pb = _pixels(a), _pixels(b)
        assert pa.shape == (64, 64, 3)
        assert np.array_equal(pa, pb), f"image {i} differs"
    assert len({_pixels(p).tobytes() for p in plain}) == 8  # 8 different seeds' noise, not 1 copy


def test_sleep_per_image_sleeps_per_image(clusters: Clusters) -> None:
    client = ComfyClient(clusters.one.urls[0])
    wf = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 3, "color": 0}},
        "2": {"class_type": "SleepPerImage", "inputs": {"images": ["1", 0],
                                                        "seconds_per_image": 0.25}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }  # fmt: skip
    began = time.monotonic()
    outputs = client.run(wf)
    assert time.monotonic() - began >= 0.75
    assert len(outputs["3"]["images"]) == 3


# --- (c) a follower killed, then restarted ---------------------------------------------------


def test_killed_follower_restarts_on_its_port(clusters: Clusters) -> None:
    two = clusters.two
    old_pid = two.pid(1)
    assert two.kill_rank(1) == 128 + signal.SIGKILL
    assert not two.is_running(1)
    assert not two.is_ready(1)
    assert two.poll() is None  # killed on purpose: not a failure
    assert ComfyClient(two.urls[0]).is_up()  # the leader keeps serving
    new_pid = two.restart_rank(1)
    assert new_pid != old_pid
    try:
        two.wait_ready(ranks=[1], timeout=READY_TIMEOUT_S)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{tail(clusters.two_log)}") from exc
    client = ComfyClient(two.urls[1])
    assert client.is_up()
    assert "ClusterFanOutLatent" in client.object_info()
    assert two.poll() is None
    assert ComfyClient(two.urls[0]).is_up()


def test_rank_dying_stops_the_command_with_its_exit_status(clusters: Clusters) -> None:
    # Last test of the 1-rank cluster: kills its server, the launcher must notice and exit.
    cli = clusters.one
    pid = _server_pid(cli.urls[0])
    os.kill(pid, signal.SIGKILL)
    code = cli.proc.wait(60)
    text = tail(cli.log)
    assert code == 128 + signal.SIGKILL, text
    assert "[launcher] rank 0 exited with code 137" in text
    assert not ComfyClient(cli.urls[0]).is_up()


def _server_pid(url: str) -> int:
    """The pid of the ComfyUI server on ``url``'s port (found in /proc by its command line)."""
    port = url.rsplit(":", 1)[1]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_server = any(a.endswith(b"comfyui_run.py") for a in argv) and b"--port" in argv
        if is_server and argv[argv.index(b"--port") + 1].decode() == port:
            return int(entry)
    raise AssertionError(f"no ComfyUI server process for {url}")


# --- the command line, without a full start ------------------------------------------------------


def test_sigint_while_starting_stops_everything(comfy_env: ComfyEnv, tmp_path: Path) -> None:
    cli = _start_cli(comfy_env, tmp_path, 2)
    try:
        wait_for_line(cli.log, ["[rank 1] "], cli.proc, 60)  # the servers are running
        cli.proc.send_signal(signal.SIGINT)
        code = cli.proc.wait(60)
    finally:
        _stop_cli(cli)
    assert code == 128 + signal.SIGINT, tail(cli.log)
    assert "got SIGINT; stopping all ranks" in cli.log.read_text()
    for url in cli.urls:
        assert not ComfyClient(url).is_up()
    with pytest.raises(AssertionError):
        _server_pid(cli.urls[0])


def test_port_in_use_is_a_one_line_error(
    comfy_python: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port_range(2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        config = ComfyClusterConfig(nproc=2, port=port, python=comfy_python)
        with pytest.raises(ConfigurationError, match=f"port {port + 1} .rank 1. is in use"):
            start_comfy_cluster(config)
        argv = ["--nproc", "2", "--port", str(port), "--python", comfy_python]
        assert comfyui_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pick another --port" in err


def test_python_without_comfyui_names_the_install_script(tmp_path: Path) -> None:
    import sys

    config = ComfyClusterConfig(nproc=1, port=free_port_range(1), python=sys.executable)
    with pytest.raises(ConfigurationError, match=r"tools/comfyui/install\.sh"):
        start_comfy_cluster(config)
    missing = ComfyClusterConfig(nproc=1, python=str(tmp_path / "nope" / "python"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        start_comfy_cluster(missing)


def test_bad_arguments_are_rejected_before_anything_starts() -> None:
    with pytest.raises(ConfigurationError, match="set per rank"):
        ComfyClusterConfig(nproc=1, comfy_args=["--port", "1"]).validate()
    with pytest.raises(ConfigurationError, match=r"65535"):
        ComfyClusterConfig(nproc=3, port=65534).validate()
    assert comfyui_main(["--port", "1"]) == 2  # --nproc missing


def test_subcommand_after_launcher_options_is_hoisted() -> None:
    subs = {"comfyui"}
    assert hoist_subcommand(["--nproc", "2", "comfyui", "--port", "9"], subs) == [
        "comfyui", "--nproc", "2", "--port", "9",
    ]  # fmt: skip
    assert hoist_subcommand(["--nproc=2", "--no-prefix", "comfyui"], subs) == [
        "comfyui", "--nproc=2", "--no-prefix",
    ]  # fmt: skip
    plain = ["--nproc", "2", "--", "python", "comfyui"]
    assert hoist_subcommand(plain, subs) == plain
    assert hoist_subcommand(["--nproc", "2", "python", "x.py"], subs) == [
        "--nproc", "2", "python", "x.py",
    ]  # fmt: skip


def test_run_comfy_under_mpirun_picks_port_base_plus_rank(tmp_path: Path) -> None:
    options, comfy_args = parse_run_args(
        ["--port-base", "9000", "--rank-dirs", str(tmp_path), "--", "--cpu", "--listen", "0.0.0.0"]
    )
    assert (options.port_base, options.rank_dirs) == (9000, str(tmp_path))
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "5"}  # as MPICH's mpirun exports them
    args = plan_comfy_args(options, comfy_args, env, "python")
    assert args[:3] == ["--cpu", "--listen", "0.0.0.0"]
    assert args[args.index("--port") + 1] == "9001"
    assert args[args.index("--output-directory") + 1] == str(tmp_path / "rank1" / "output")
    assert (tmp_path / "rank1" / "user").is_dir()
    assert env["COMFY_CLUSTER_COMFY_PORT"] == "9001"
    assert env["COMFY_CLUSTER_COMFY_URL"] == "http://127.0.0.1:9001"
    assert env["COMFY_CLUSTER_LEADER_URL"] == "http://127.0.0.1:9000"
    # Without per-rank options the arguments pass through untouched (the recipe's plain run).
    plain = ["--cpu", "--port", "8199"]
    assert parse_run_args(plain) == (RunOptions(), plain)
    with pytest.raises(RunError, match="--port-base and ComfyUI's --port"):
        plan_comfy_args(RunOptions(port_base=9000), ["--port", "1"], {}, "python")
