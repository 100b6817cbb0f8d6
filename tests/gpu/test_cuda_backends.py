"""CUDA tensors through every backend: the device checks on each rank's GPU.

Deselected without a CUDA device (see tests/conftest.py); run with ``pytest -m gpu``.  On a
machine with one GPU every rank shares it, except under nccl, which needs a GPU per rank.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from collectives.testing import run_local
from collectives.testing.device_checks import DEVICE_CHECKS, rank_device
from tests.conformance.worlds import ROOT, check_result

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(DEVICE_CHECKS))
def test_local(name: str, size: int) -> None:
    run_local(size, lambda comm: DEVICE_CHECKS[name](comm, rank_device("cuda", comm.rank)))


@pytest.mark.gloo
@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(DEVICE_CHECKS))
def test_gloo(name: str, size: int) -> None:
    check_result("gloo", size, name, device="cuda")


@pytest.mark.mpi
@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(DEVICE_CHECKS))
def test_mpi(name: str, size: int) -> None:
    check_result("mpi", size, name, device="cuda")


@pytest.mark.parametrize("name", sorted(DEVICE_CHECKS))
def test_nccl(name: str) -> None:
    size = min(torch.cuda.device_count(), 2)
    check_result("nccl", size, name, device="cuda")


def test_nccl_refuses_more_ranks_than_gpus() -> None:
    """A rank whose LOCAL_RANK names no GPU gets one line naming the variable, not a CUDA trace."""
    n = torch.cuda.device_count() + 1
    code = "import collectives; collectives.init('nccl', timeout=20)"
    launch = [
        sys.executable,
        "-m",
        "comfyui_cluster.launchers",
        "--nproc",
        str(n),
        "--backend",
        "nccl",
        "--",
    ]
    proc = subprocess.run(
        [*launch, sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "ConfigurationError" in out and "LOCAL_RANK" in out, out[-3000:]
