"""Nodes that queue workflows on the cluster, and subgraph markers."""

from __future__ import annotations

from typing import Any

from . import workflow
from .nodes_base import _HIDDEN_ID, ANY, _ClusterNode, _Node


class ClusterExecuteWorkflow(_ClusterNode):
    DESCRIPTION = (
        "The leader queues an API-format workflow, saved by name in ComfyUI's user workflows "
        "folder, on the whole cluster (followers do nothing). Outputs the new prompt id."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_id",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                # The original project's input name, kept so its saved workflows still load; it
                # is a name in the workflows folder now, never a path.
                "workflow_path": (
                    "STRING",
                    {
                        "default": "workflow_api.json",
                        "tooltip": "Name of an API-format workflow in the leader's user workflows "
                        "folder (<user dir>/default/workflows); no absolute paths, no '..'.",
                    },
                )
            },
            "optional": {
                "input_overrides": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": 'JSON {"node_id": {"input_name": value}} written into the '
                        "workflow before it is queued.",
                    },
                ),
                "trigger": (ANY,),
            },
        }

    def run(self, workflow_path: str, input_overrides: str = "", trigger: Any = None) -> tuple[str]:
        if not self.runtime.is_leader():
            return ("",)
        loaded = workflow.load_named_workflow(workflow_path, what=type(self).__name__)
        prompt = workflow.apply_overrides(loaded, input_overrides)
        return (self.runtime.queue_prompt(prompt, type(self).__name__),)


class ClusterExecuteCurrentWorkflow(_ClusterNode):
    DESCRIPTION = (
        "Run this workflow `iterations` times: the leader queues the next run on the cluster "
        "(seeds incremented unless turned off) until the count is used up."
    )
    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("prompt_id", "remaining")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "iterations": ("INT", {"default": 2, "min": 1, "max": 100000}),
                "vary_seed": ("BOOLEAN", {"default": True}),
            },
            "optional": {"trigger": (ANY,)},
            "hidden": {"prompt": "PROMPT", **_HIDDEN_ID},
        }

    def run(
        self,
        iterations: int,
        vary_seed: bool = True,
        trigger: Any = None,
        prompt: dict[str, Any] | None = None,
        unique_id: Any = None,
    ) -> tuple[str, int]:
        remaining = max(0, int(iterations) - 1)
        if not self.runtime.is_leader() or remaining == 0:
            return ("", remaining)
        if prompt is None or unique_id is None:
            raise RuntimeError(f"{type(self).__name__}: ComfyUI passed no current prompt")
        nxt = workflow.next_iteration(prompt, str(unique_id), vary_seed)
        assert nxt is not None
        return (self.runtime.queue_prompt(nxt, type(self).__name__), remaining)


class ClusterStartSubgraph(_Node):
    DESCRIPTION = "Marks where subgraph `name` starts; passes its value through."
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("value",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"name": ("STRING", {"default": "subgraph"})},
            "optional": {"value": (ANY,)},
        }

    def run(self, name: str, value: Any = None) -> tuple[Any]:
        return (value,)


class ClusterEndSubgraph(_Node):
    DESCRIPTION = "Marks where subgraph `name` ends; passes its value through."
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("value",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"name": ("STRING", {"default": "subgraph"})},
            "optional": {"value": (ANY,)},
        }

    def run(self, name: str, value: Any = None) -> tuple[Any]:
        return (value,)


class ClusterUseSubgraph(_ClusterNode):
    DESCRIPTION = (
        "The leader queues subgraph `name` of this workflow (from its Start to its End node, with "
        "what it depends on) as a prompt of its own on the cluster."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_id",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"name": ("STRING", {"default": "subgraph"})},
            "optional": {"trigger": (ANY,)},
            "hidden": {"prompt": "PROMPT", **_HIDDEN_ID},
        }

    def run(
        self,
        name: str,
        trigger: Any = None,
        prompt: dict[str, Any] | None = None,
        unique_id: Any = None,
    ) -> tuple[str]:
        if not self.runtime.is_leader():
            return ("",)
        if prompt is None:
            raise RuntimeError(f"{type(self).__name__}: ComfyUI passed no current prompt")
        sub = workflow.subgraph_prompt(prompt, name)
        return (self.runtime.queue_prompt(sub, type(self).__name__),)
