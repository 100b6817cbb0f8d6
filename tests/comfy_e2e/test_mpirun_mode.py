"""ComfyUI started by a real ``mpiexec -n 2`` through tools/comfyui/run_comfy.py (no launcher).

The ranks come from MPICH's variables, each listens on ``--port-base + rank``, the node pack is
linked into the base directory by the ranks themselves, the ``mpi`` backend is detected, and a
cluster prompt queued on rank 0 runs on both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfyui_cluster.launchers.comfyui_base import NODE_PACK_LINK
from tests.comfy_e2e.comfy_client import ComfyClient
from tests.comfy_e2e.conftest import REPO, ComfyEnv, free_port_range, make_base, tail

pytestmark = [pytest.mark.comfy, pytest.mark.mpi]

READY_TIMEOUT_S = 240.0
RUN_COMFY = REPO / "tools" / "comfyui" / "run_comfy.py"


@pytest.fixture(scope="module")
def mpi_cluster(
    comfy_env: ComfyEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[ComfyClient], Path, Path]]:
    root = tmp_path_factory.mktemp("mpirun")
    base = make_base(root / "base", comfy_env.models)
    port = free_port_range(2)
    mpiexec = Path(comfy_env.python).parent / "mpiexec"
    command = [
        str(mpiexec), "-n", "2", comfy_env.python, str(RUN_COMFY),
        "--port-base", str(port), "--rank-dirs", str(base), "--",
        "--cpu", "--listen", "127.0.0.1", "--base-directory", str(base),
        "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
    ]  # fmt: skip
    env = dict(os.environ, COMFY_CLUSTER_TIMEOUT="60", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "COMFY_CLUSTER_BACKEND"):
        env.pop(name, None)
    log = root / "mpirun.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        clients = [ComfyClient(f"http://127.0.0.1:{port + r}") for r in range(2)]
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not all(c.is_up() for c in clients):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mpiexec ComfyUI not ready\n{tail(log)}")
                time.sleep(0.5)
            yield clients, base, log
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_ranks_link_the_node_pack_and_listen_on_port_base_plus_rank(
    mpi_cluster: tuple[list[ComfyClient], Path, Path],
) -> None:
    clients, base, _ = mpi_cluster
    linked = base / "custom_nodes" / NODE_PACK_LINK
    assert linked.resolve() == REPO.resolve()
    for client in clients:
        assert "ClusterFanOutImage" in client.object_info()


def test_a_cluster_prompt_runs_on_both_mpi_ranks(
    mpi_cluster: tuple[list[ComfyClient], Path, Path],
) -> None:
    clients, _, log = mpi_cluster
    leader = clients[0]
    wf = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 4,
                                                     "color": 255}},
        "2": {"class_type": "ClusterFanOutImage", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ClusterFanInImages", "inputs": {"images": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "mpi"}},
        "5": {"class_type": "ClusterInfo", "inputs": {}},
    }  # fmt: skip
    try:
        outputs = leader.run(wf, timeout=180)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{tail(log)}") from exc
    assert len(outputs["4"]["images"]) == 4
    info = outputs["5"]["text"][0]
    assert "mpi" in info and "connected: 2/2" in info, info
