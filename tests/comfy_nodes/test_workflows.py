"""Workflow nodes: what they do without the server integration, and with a stand-in hook."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collectives import Communicator
from comfy_nodes import cluster
from comfy_nodes.workflow import (
    apply_overrides,
    as_api_prompt,
    load_api_workflow,
    load_named_workflow,
    next_iteration,
    subgraph_prompt,
)

from .helpers import run_node, spmd

PROMPT: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
    "3": {"class_type": "ClusterStartSubgraph", "inputs": {"name": "up", "value": ["2", 0]}},
    "4": {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "model": ["1", 0]}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0]}},
    "6": {"class_type": "ClusterEndSubgraph", "inputs": {"name": "up", "value": ["4", 0]}},
    "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    "8": {"class_type": "KSampler", "inputs": {"seed": 5, "model": ["1", 0]}},
    "9": {"class_type": "ClusterExecuteCurrentWorkflow", "inputs": {"iterations": 3}},
}


@pytest.fixture
def queued() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    class Queuing(cluster.Runtime):
        def queue_prompt(self, prompt: dict[str, Any], what: str) -> str:
            seen.append(prompt)
            return f"id-{len(seen)}"

    with cluster.installed(Queuing()):
        yield seen


def _saved(comfy_folders: Path, name: str = "wf.json") -> Path:
    folder = comfy_folders / "user" / "default" / "workflows"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(PROMPT))
    return path


def test_execute_workflow_queues_on_the_leader_only(comfy_folders: Path, queued: list[Any]) -> None:
    _saved(comfy_folders)

    def rank(comm: Communicator) -> str:
        return run_node("ClusterExecuteWorkflow", "wf", '{"8": {"seed": 77}}')[0]

    assert spmd(3, rank) == ["id-1", "", ""]
    assert len(queued) == 1 and queued[0]["8"]["inputs"]["seed"] == 77
    assert PROMPT["8"]["inputs"]["seed"] == 5  # the loaded file is not modified


def test_without_the_server_integration_the_error_says_so(comfy_folders: Path) -> None:
    _saved(comfy_folders)
    with pytest.raises(RuntimeError, match="server integration"):
        spmd(1, lambda comm: run_node("ClusterExecuteWorkflow", "wf.json"))


def test_workflows_load_by_name_from_the_user_workflows_folder_only(
    comfy_folders: Path, tmp_path: Path
) -> None:
    (comfy_folders / "user" / "default" / "workflows" / "sub").mkdir(parents=True)
    _saved(comfy_folders, "sub/named.json")
    assert load_named_workflow("sub/named") == PROMPT
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(PROMPT))
    folder = comfy_folders / "user" / "default" / "workflows"
    (folder / "escape.json").symlink_to(outside)
    (folder / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    for name, why in [
        (str(outside), "not a workflow name"),
        ("../../../outside.json", "not a workflow name"),
        ("sub/../../x.json", "not a workflow name"),
        ("C:\\outside.json", "not a workflow name"),
        ("escape.json", "outside the user workflows folder"),
        ("linked_dir/outside.json", "outside the user workflows folder"),
        ("", "no workflow name"),
    ]:
        with pytest.raises(ValueError, match=why):
            load_named_workflow(name, what="ClusterExecuteWorkflow")
    with pytest.raises(
        FileNotFoundError, match=r"ClusterExecuteWorkflow: no workflow 'gone\.json'"
    ):
        load_named_workflow("gone", what="ClusterExecuteWorkflow")


def test_images_load_from_comfyuis_folders_only(comfy_folders: Path, tmp_path: Path) -> None:
    from comfy_nodes.images import resolve_image_path

    (comfy_folders / "input" / "a.png").write_bytes(b"x")
    (comfy_folders / "output" / "b.png").write_bytes(b"x")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    (comfy_folders / "input" / "link.png").symlink_to(outside)
    assert resolve_image_path("a.png") == (comfy_folders / "input" / "a.png").resolve()
    assert resolve_image_path("b.png [output]") == (comfy_folders / "output" / "b.png").resolve()
    for name, why in [
        (str(outside), "not an image name"),
        ("../secret.png", "not an image name"),
        ("../../secret.png [output]", "not an image name"),
        ("link.png", "outside ComfyUI's folder"),
    ]:
        with pytest.raises(ValueError, match=why) as err:
            resolve_image_path(name)
        assert "ClusterBroadcastLoadedImage" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"no image 'gone\.png'"):
        resolve_image_path("gone.png")


def test_ui_format_and_bad_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Export \\(API\\)"):
        as_api_prompt({"nodes": [], "links": []})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_api_workflow(bad)
    with pytest.raises(FileNotFoundError):
        load_api_workflow(tmp_path / "missing.json")
    with pytest.raises(KeyError, match="'42'"):
        apply_overrides(PROMPT, {"42": {"x": 1}})
    assert as_api_prompt({"prompt": PROMPT}) == PROMPT  # a POST /prompt body is accepted


def test_execute_current_workflow_counts_down(queued: list[Any]) -> None:
    def rank(comm: Communicator) -> tuple[str, int]:
        return run_node("ClusterExecuteCurrentWorkflow", 3, True, prompt=PROMPT, unique_id="9")

    assert spmd(2, rank) == [("id-1", 2), ("", 2)]
    nxt = queued[0]
    assert nxt["9"]["inputs"]["iterations"] == 2 and nxt["8"]["inputs"]["seed"] == 6
    assert next_iteration(nxt, "9", vary_seed=False) is not None
    last = {**PROMPT, "9": {"class_type": "X", "inputs": {"iterations": 1}}}
    assert next_iteration(last, "9") is None
    assert spmd(
        1, lambda c: run_node("ClusterExecuteCurrentWorkflow", 1, prompt=last, unique_id="9")
    ) == [("", 0)]


def test_subgraph_is_start_to_end_with_side_branches_and_dependencies() -> None:
    sub = subgraph_prompt(PROMPT, "up")
    assert sorted(sub) == ["1", "2", "3", "4", "5", "6"]  # not 7 (after End), 8, 9
    with pytest.raises(ValueError, match="exactly one"):
        subgraph_prompt(PROMPT, "other")


def test_use_subgraph_queues_the_region(queued: list[Any]) -> None:
    def rank(comm: Communicator) -> str:
        return run_node("ClusterUseSubgraph", "up", prompt=PROMPT, unique_id="10")[0]

    assert spmd(2, rank) == ["id-1", ""]
    assert sorted(queued[0]) == ["1", "2", "3", "4", "5", "6"]


def test_start_and_end_pass_values_through() -> None:
    marker = object()
    assert run_node("ClusterStartSubgraph", "x", marker)[0] is marker
    assert run_node("ClusterEndSubgraph", "x", marker)[0] is marker
