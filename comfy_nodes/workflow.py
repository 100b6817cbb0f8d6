"""API-format prompts: loading, overriding inputs, extracting a marked subgraph, re-queuing.

An API-format prompt (what ComfyUI's "Export (API)" saves and ``POST /prompt`` takes) maps node
ids to ``{"class_type": str, "inputs": {name: value or [source_id, output_index]}}``.  Everything
here is pure data manipulation; queuing goes through the runtime
(:meth:`comfy_nodes.cluster.Runtime.queue_prompt`).
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .folders import contained_file, relative_name

Prompt = dict[str, Any]

START_SUBGRAPH = "ClusterStartSubgraph"
END_SUBGRAPH = "ClusterEndSubgraph"
USE_SUBGRAPH = "ClusterUseSubgraph"
SEED_INPUTS = ("seed", "noise_seed")


def as_api_prompt(data: Any, source: str = "workflow") -> Prompt:
    """Validate (and unwrap a ``{"prompt": ...}`` request body into) an API-format prompt."""
    if isinstance(data, Mapping) and isinstance(data.get("prompt"), Mapping):
        data = data["prompt"]
    if isinstance(data, Mapping) and "nodes" in data and "links" in data:
        raise ValueError(
            f"{source} is a UI-format workflow; save it with 'Export (API)' (API format) instead"
        )
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{source} is not an API-format prompt (a non-empty JSON object)")
    prompt: Prompt = {}
    for node_id, node in data.items():
        if (
            not isinstance(node, Mapping)
            or not isinstance(node.get("class_type"), str)
            or not isinstance(node.get("inputs", {}), Mapping)
        ):
            raise ValueError(
                f"{source}: node {node_id!r} is not {{'class_type': str, 'inputs': {{...}}}}"
            )
        prompt[str(node_id)] = copy.deepcopy(dict(node))
        prompt[str(node_id)].setdefault("inputs", {})
    return prompt


class WorkflowNotFoundError(FileNotFoundError):
    """A workflow name that does not name a file inside the user workflows folder."""


def user_workflows_dir() -> Path:
    """ComfyUI's user workflows folder, ``<user directory>/default/workflows`` (where the UI saves
    workflows), through ComfyUI's own ``folder_paths``."""
    try:
        folder_paths = importlib.import_module("folder_paths")
    except ImportError:
        raise RuntimeError(
            "workflows are loaded from ComfyUI's user workflows folder, and ComfyUI's "
            "folder_paths is not importable here"
        ) from None
    return Path(folder_paths.get_user_directory()) / "default" / "workflows"


def workflow_file(name: str, folder: Path, what: str = "workflow") -> Path:
    """The file ``name`` names inside ``folder``: a relative name (sub-folders allowed, ``.json``
    added when missing) that stays inside the folder once every symlink is resolved."""
    text = name.strip()
    if not text:
        raise ValueError(f"{what}: no workflow name given (a file name in {folder})")
    pure = relative_name(text)
    if pure is None:
        raise ValueError(
            f"{what}: {name!r} is not a workflow name; give a file name relative to the user "
            f"workflows folder {folder} (no absolute paths, no '..')"
        )
    if pure.suffix.lower() != ".json":
        pure = pure.with_name(pure.name + ".json")
    file = contained_file(folder, str(pure), what, name, "the user workflows folder")
    if not file.is_file():
        raise WorkflowNotFoundError(f"{what}: no workflow {str(pure)!r} in {folder}")
    return file


def load_named_workflow(name: str, folder: Path | None = None, what: str = "workflow") -> Prompt:
    """The API-format prompt saved as ``name`` in the user workflows folder (or ``folder``)."""
    file = workflow_file(name, user_workflows_dir() if folder is None else folder, what)
    return load_api_workflow(file)


def load_api_workflow(path: str | Path) -> Prompt:
    """Read an API-format prompt from a file the caller has already chosen (a trusted path; the
    node loads by name through :func:`load_named_workflow`)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(f"cannot read workflow {str(file)!r}: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"workflow {str(file)!r} is not valid JSON: {err}") from None
    return as_api_prompt(data, f"workflow {str(file)!r}")


def apply_overrides(prompt: Prompt, overrides: str | Mapping[str, Any] | None) -> Prompt:
    """A copy of ``prompt`` with ``{"node_id": {"input": value}}`` written into node inputs."""
    if overrides is None or (isinstance(overrides, str) and not overrides.strip()):
        return copy.deepcopy(prompt)
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"input overrides are not valid JSON: {err}") from None
    if not isinstance(overrides, Mapping):
        raise ValueError('input overrides must look like {"node_id": {"input_name": value}}')
    out = copy.deepcopy(prompt)
    for node_id, values in overrides.items():
        if str(node_id) not in out:
            raise KeyError(f"input overrides name node {node_id!r}, which the workflow lacks")
        if not isinstance(values, Mapping):
            raise ValueError(f"input overrides for node {node_id!r} must be an object")
        out[str(node_id)]["inputs"].update(copy.deepcopy(dict(values)))
    return out


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and isinstance(value[1], int)
    )


def _sources(prompt: Prompt, node_id: str) -> set[str]:
    return {str(v[0]) for v in prompt[node_id]["inputs"].values() if _is_link(v)}


def ancestors(prompt: Prompt, roots: Iterable[str]) -> set[str]:
    """``roots`` and every node they depend on."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen or node not in prompt:
            continue
        seen.add(node)
        stack.extend(_sources(prompt, node))
    return seen


def _consumers(prompt: Prompt) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {node: set() for node in prompt}
    for node in prompt:
        for src in _sources(prompt, node):
            if src in out:
                out[src].add(node)
    return out


def _named(prompt: Prompt, class_type: str, name: str) -> list[str]:
    return [
        node_id
        for node_id, node in prompt.items()
        if node["class_type"] == class_type and node["inputs"].get("name") == name
    ]


def subgraph_prompt(prompt: Prompt, name: str) -> Prompt:
    """The nodes of subgraph ``name``, and what they depend on, as a prompt of its own.

    The subgraph is everything reachable from its ClusterStartSubgraph without passing its
    ClusterEndSubgraph (side branches such as a SaveImage included), plus the End node; without
    a Start node it is the End node.  Their dependencies (model loaders, ...) come along.
    """
    ends = _named(prompt, END_SUBGRAPH, name)
    starts = _named(prompt, START_SUBGRAPH, name)
    if len(ends) != 1 or len(starts) > 1:
        raise ValueError(
            f"subgraph {name!r} needs exactly one {END_SUBGRAPH} and at most one "
            f"{START_SUBGRAPH} with that name; the workflow has {len(ends)} and {len(starts)}"
        )
    end = ends[0]
    region = {end, *starts}
    consumers = _consumers(prompt)
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node == end:
            continue
        for consumer in consumers[node]:
            if consumer not in region:
                region.add(consumer)
                stack.append(consumer)
    keep = ancestors(prompt, region)
    recursive = [
        n
        for n in keep
        if prompt[n]["class_type"] == USE_SUBGRAPH and prompt[n]["inputs"].get("name") == name
    ]
    if recursive:
        raise ValueError(f"subgraph {name!r} uses itself (node {recursive[0]!r})")
    return {node_id: copy.deepcopy(prompt[node_id]) for node_id in prompt if node_id in keep}


def next_iteration(prompt: Prompt, node_id: str, vary_seed: bool = True) -> Prompt | None:
    """The prompt to queue after this one for ClusterExecuteCurrentWorkflow, or None when done.

    The node's ``iterations`` input counts the runs still to do including this one; the copy
    gets one less.  With ``vary_seed`` every integer ``seed``/``noise_seed`` input is incremented,
    so the next run is not answered from ComfyUI's cache with the same picture.
    """
    if node_id not in prompt:
        raise KeyError(f"node {node_id!r} is not in the current prompt")
    remaining = int(prompt[node_id]["inputs"].get("iterations", 1))
    if remaining <= 1:
        return None
    out = copy.deepcopy(prompt)
    out[node_id]["inputs"]["iterations"] = remaining - 1
    if vary_seed:
        for node in out.values():
            for key in SEED_INPUTS:
                value = node["inputs"].get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    node["inputs"][key] = (value + 1) % 2**64
    return out
