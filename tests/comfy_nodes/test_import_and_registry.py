"""The package imports without ComfyUI or a cluster, and registers every node of the original."""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfy_nodes.nodes import ANY

ROOT = Path(__file__).resolve().parents[2]

ORIGINAL_NODES = [
    "ClusterInfo",
    "ClusterFreeNow",
    "ClusterFinallyFree",
    "ClusterExecuteWorkflow",
    "ClusterExecuteCurrentWorkflow",
    "ClusterStartSubgraph",
    "ClusterEndSubgraph",
    "ClusterUseSubgraph",
    "ClusterBroadcastTensor",
    "ClusterListenTensorBroadcast",
    "ClusterBroadcastLoadedImage",
    "ClusterFanOutImage",
    "ClusterFanInImages",
    "ClusterGatherImages",
    "ClusterFanOutLatent",
    "ClusterFanInLatent",
    "ClusterGatherLatents",
    "ClusterFanOutMask",
    "ClusterFanInMask",
    "ClusterGatherMasks",
    "ClusterGetInstanceWorkItemFromBatch",
    "ClusterSplitBatchToList",
    "ClusterFlattenBatchedImageList",
    "ClusterInsertAtIndex",
    "ClusterStridedReorder",
]

COLLECTIVE = [
    "ClusterBroadcastTensor",
    "ClusterListenTensorBroadcast",
    "ClusterBroadcastLoadedImage",
    "ClusterFanOutImage",
    "ClusterFanInImages",
    "ClusterGatherImages",
    "ClusterFanOutLatent",
    "ClusterFanInLatent",
    "ClusterGatherLatents",
    "ClusterFanOutMask",
    "ClusterFanInMask",
    "ClusterGatherMasks",
]
SIDE_EFFECTS = [
    "ClusterInfo",
    "ClusterFreeNow",
    "ClusterFinallyFree",
    "ClusterExecuteWorkflow",
    "ClusterExecuteCurrentWorkflow",
    "ClusterUseSubgraph",
]

CLUSTER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PMI_RANK",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
)


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in CLUSTER_ENV and not k.startswith(("COMFY_CLUSTER_", "PMIX_", "MPI_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_every_original_node_is_registered_once() -> None:
    # ClusterSync is internal: the cluster prompt rewrite adds it (server/prompts.py).
    assert sorted(NODE_CLASS_MAPPINGS) == sorted([*ORIGINAL_NODES, "ClusterSync"])
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert all(NODE_DISPLAY_NAME_MAPPINGS.values())


@pytest.mark.parametrize("name", ORIGINAL_NODES)
def test_node_is_a_valid_v1_node(name: str) -> None:
    cls = NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    assert cls.CATEGORY == "cluster"
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    if hasattr(cls, "OUTPUT_IS_LIST"):
        assert len(cls.OUTPUT_IS_LIST) == len(cls.RETURN_TYPES)
    json.dumps(spec)  # /object_info serialises it
    # Every declared input (hidden ones included) is accepted by the function.
    names = [n for part in spec.values() for n in part]
    inspect.signature(getattr(cls, cls.FUNCTION)).bind(None, **dict.fromkeys(names))
    for part in ("required", "optional"):
        for input_name, decl in spec.get(part, {}).items():
            assert isinstance(decl, tuple) and 1 <= len(decl) <= 2, input_name


@pytest.mark.parametrize("name", COLLECTIVE + SIDE_EFFECTS)
def test_cluster_nodes_are_never_cached(name: str) -> None:
    cls = NODE_CLASS_MAPPINGS[name]
    assert cls.NOT_IDEMPOTENT is True
    fingerprint = cls.IS_CHANGED(anything=1)
    assert math.isnan(fingerprint)  # nan != nan: ComfyUI always re-executes


def test_any_type_matches_every_type_in_validation() -> None:
    # ComfyUI's validate_node_input starts with `not received_type != input_type`.
    received, expected = ANY, "IMAGE"
    assert not received != expected  # noqa: SIM202
    assert ANY == "*" and json.dumps(ANY) == '"*"'


def test_import_starts_nothing_and_world_of_one_is_identity() -> None:
    code = r"""
import socket, threading, sys
class NoSocket(socket.socket):
    def __init__(self, *a, **k):
        raise AssertionError("a socket was opened")
socket.socket = NoSocket
import comfy_nodes
from comfy_nodes import cluster, NODE_CLASS_MAPPINGS
assert threading.active_count() == 1, threading.enumerate()
assert cluster.runtime().peek() is None
assert "collectives" not in sys.modules
for cls in NODE_CLASS_MAPPINGS.values():
    cls.INPUT_TYPES()
assert threading.active_count() == 1
import torch
img = torch.rand(5, 4, 4, 3)
def run(name, *a, **k):
    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)(*a, **k)
assert run("ClusterFanOutImage", img)[0] is img
assert run("ClusterFanInImages", img)[0] is img
assert run("ClusterGatherImages", img)[0] is img
assert run("ClusterBroadcastTensor", img)[0] is img
lat = {"samples": torch.zeros(3, 4, 2, 2)}
assert run("ClusterFanOutLatent", lat)[0] == lat
assert "batch_index" not in run("ClusterFanOutLatent", lat)[0]
comm = cluster.runtime().communicator()
assert (comm.rank, comm.size, comm.backend) == (0, 1, "local")
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
