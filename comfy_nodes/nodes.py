"""The V1 ComfyUI node classes: thin adapters over the plain modules of this package.

Every rank runs the same workflow (SPMD), and the n-th collective of one rank meets the n-th of
every other.  So nodes that communicate ("cluster" nodes) are never served from ComfyUI's cache
(``NOT_IDEMPOTENT`` and an ``IS_CHANGED`` never equal to itself), and no input is evaluated on
some ranks only: ComfyUI's execution order depends on which nodes run, and it must be the same on
every rank.  Inputs only the leader uses are computed everywhere and ignored on followers.
See docs/nodes.md for what each node does on each rank.
"""

from __future__ import annotations

from typing import Any, ClassVar

from . import cluster, distribute, lists, memory, workflow
from . import images as image_files
from .collective import node_tag
from .distribute import CODECS, LOSSLESS
from .tensors import as_mask_batch

CATEGORY = "cluster"


class AnyType(str):
    """A type name that matches every other in ComfyUI's input validation (``"*"``)."""

    __slots__ = ()

    def __ne__(self, other: object) -> bool:
        return False


ANY = AnyType("*")

_WEIGHTS = (
    "STRING",
    {
        "default": "",
        "tooltip": "Share of the batch per rank, e.g. '3,1' (read on the leader). Empty: the "
        "COMFY_CLUSTER_WEIGHTS variable, else equal shares.",
    },
)
_CODEC = (
    list(CODECS),
    {
        "default": LOSSLESS,
        "tooltip": "lossless keeps every value and the dtype; png is smaller on slow links but "
        "rounds every pixel to 8 bits.",
    },
)
_HIDDEN_ID = {"unique_id": "UNIQUE_ID"}


def _leader_input(type_name: str, what: str) -> tuple[str, dict[str, Any]]:
    # Not lazy, on purpose: a follower skipping what feeds this input would execute a different
    # set of nodes than the leader, and ComfyUI's execution order (hence the order of the
    # collectives) depends on that set.  Followers compute the value and it is ignored.
    return (type_name, {"tooltip": f"{what} Only the leader's value is used."})


class _Node:
    CATEGORY: ClassVar[str] = CATEGORY
    FUNCTION: ClassVar[str] = "run"
    DESCRIPTION: ClassVar[str] = ""


class _ClusterNode(_Node):
    """Communicates or has side effects: runs every time, on every rank."""

    NOT_IDEMPOTENT: ClassVar[bool] = True

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # never equal to the previous value: never cached

    @classmethod
    def tag(cls, unique_id: Any) -> str:
        return node_tag(cls.__name__, None if unique_id is None else str(unique_id))


# -- cluster management ---------------------------------------------------------------------------
class ClusterInfo(_ClusterNode):
    DESCRIPTION = "This rank, the world size, the backend and the health of every peer."
    RETURN_TYPES = ("STRING", "INT", "INT", "INT")
    RETURN_NAMES = ("info", "rank", "world_size", "connected")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}, "optional": {"trigger": (ANY,)}}

    def run(self, trigger: Any = None) -> dict[str, Any]:
        status = cluster.cluster_status()
        text = status.text()
        return {
            "ui": {"text": [text]},
            "result": (text, status.rank, status.size, status.connected),
        }


class ClusterFreeNow(_ClusterNode):
    DESCRIPTION = "Free memory on every rank now (garbage, cached GPU memory; models if asked)."
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("trigger",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {},
            "optional": {
                "trigger": (ANY, {"tooltip": "Passed through; connect it to order this node."}),
                "unload_models": ("BOOLEAN", {"default": False}),
            },
        }

    def run(self, trigger: Any = None, unload_models: bool = False) -> tuple[Any]:
        memory.free_now(unload_models=unload_models)
        return (trigger,)


class ClusterFinallyFree(_ClusterNode):
    DESCRIPTION = "Unload models and free memory on every rank once the workflow has finished."
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("trigger",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}, "optional": {"trigger": (ANY,)}}

    def run(self, trigger: Any = None) -> tuple[Any]:
        memory.free_when_finished()
        return (trigger,)


# -- workflows ------------------------------------------------------------------------------------
class ClusterExecuteWorkflow(_ClusterNode):
    DESCRIPTION = (
        "The leader queues an API-format workflow file on the whole cluster (followers do "
        "nothing). Outputs the new prompt id."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_id",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"workflow_path": ("STRING", {"default": "workflow_api.json"})},
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
        if not cluster.is_leader():
            return ("",)
        prompt = workflow.apply_overrides(
            workflow.load_api_workflow(workflow_path), input_overrides
        )
        return (cluster.call_queue_prompt_hook(prompt, type(self).__name__),)


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
        if not cluster.is_leader() or remaining == 0:
            return ("", remaining)
        if prompt is None or unique_id is None:
            raise RuntimeError(f"{type(self).__name__}: ComfyUI passed no current prompt")
        nxt = workflow.next_iteration(prompt, str(unique_id), vary_seed)
        assert nxt is not None
        return (cluster.call_queue_prompt_hook(nxt, type(self).__name__), remaining)


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
        if not cluster.is_leader():
            return ("",)
        if prompt is None:
            raise RuntimeError(f"{type(self).__name__}: ComfyUI passed no current prompt")
        sub = workflow.subgraph_prompt(prompt, name)
        return (cluster.call_queue_prompt_hook(sub, type(self).__name__),)


# -- broadcast ------------------------------------------------------------------------------------
class ClusterBroadcastTensor(_ClusterNode):
    DESCRIPTION = (
        "The leader's value (IMAGE, LATENT, MASK or anything else) on every rank, batch "
        "dimension kept. Followers' inputs are ignored."
    )
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("tensor",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"tensor": _leader_input(ANY, "The value to share.")},
            "optional": {"codec": _CODEC},
            "hidden": _HIDDEN_ID,
        }

    def run(self, tensor: Any = None, codec: str = LOSSLESS, unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        return (distribute.broadcast_value(comm, tensor, self.tag(unique_id), codec),)


class ClusterListenTensorBroadcast(ClusterBroadcastTensor):
    DESCRIPTION = (
        "The same broadcast as ClusterBroadcastTensor with the input optional: connect it for "
        "the leader; followers receive the leader's value."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {},
            "optional": {
                "tensor": _leader_input(ANY, "The value to share (the leader needs it connected)."),
                "codec": _CODEC,
            },
            "hidden": _HIDDEN_ID,
        }


class ClusterBroadcastLoadedImage(_ClusterNode):
    DESCRIPTION = (
        "The leader loads an image file (as LoadImage does) and every rank receives it; "
        "followers do not need the file."
    )
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "image": (
                    "STRING",
                    {
                        "default": "example.png",
                        "tooltip": "Path on the leader, or a file name in its input directory.",
                    },
                )
            },
            "optional": {"codec": _CODEC},
            "hidden": _HIDDEN_ID,
        }

    def run(self, image: str, codec: str = LOSSLESS, unique_id: Any = None) -> tuple[Any, Any]:
        comm = cluster.get_comm()
        return distribute.broadcast_loaded(
            comm,
            lambda: image_files.load_image(image_files.resolve_image_path(image)),
            self.tag(unique_id),
            codec,
        )


# -- fan-out / fan-in / gather --------------------------------------------------------------------
class ClusterFanOutImage(_ClusterNode):
    DESCRIPTION = "Split the leader's IMAGE batch over the ranks; each rank outputs its slice."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"image": _leader_input("IMAGE", "The whole batch.")},
            "optional": {"weights": _WEIGHTS, "codec": _CODEC},
            "hidden": _HIDDEN_ID,
        }

    def run(
        self, image: Any = None, weights: str = "", codec: str = LOSSLESS, unique_id: Any = None
    ) -> tuple[Any]:
        comm = cluster.get_comm()
        return (distribute.fan_out_batch(comm, image, self.tag(unique_id), weights, codec),)


class ClusterFanInImages(_ClusterNode):
    DESCRIPTION = (
        "The leader outputs every rank's IMAGE slice concatenated in rank order; followers "
        "output their own slice."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"images": ("IMAGE",)},
            "optional": {"codec": _CODEC},
            "hidden": _HIDDEN_ID,
        }

    def run(self, images: Any, codec: str = LOSSLESS, unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        return (distribute.fan_in_batch(comm, images, self.tag(unique_id), codec),)


class ClusterGatherImages(_ClusterNode):
    DESCRIPTION = "Every rank outputs every rank's IMAGE slice concatenated in rank order."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"images": ("IMAGE",)},
            "optional": {"codec": _CODEC},
            "hidden": _HIDDEN_ID,
        }

    def run(self, images: Any, codec: str = LOSSLESS, unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        return (distribute.gather_batch(comm, images, self.tag(unique_id), codec),)


class ClusterFanOutLatent(_ClusterNode):
    DESCRIPTION = (
        "Split the leader's LATENT batch over the ranks (noise_mask and batch_index included, so "
        "each item gets the noise it gets in a single-instance run)."
    )
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"samples": _leader_input("LATENT", "The whole batch.")},
            "optional": {"weights": _WEIGHTS},
            "hidden": _HIDDEN_ID,
        }

    def run(self, samples: Any = None, weights: str = "", unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        return (distribute.fan_out_latent(comm, samples, self.tag(unique_id), weights),)


class ClusterFanInLatent(_ClusterNode):
    DESCRIPTION = (
        "The leader outputs the whole LATENT reassembled in rank order; followers output their "
        "own slice."
    )
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT",)}, "hidden": _HIDDEN_ID}

    def run(self, samples: Any, unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        return (distribute.fan_in_latent(comm, samples, self.tag(unique_id)),)


class ClusterGatherLatents(_ClusterNode):
    DESCRIPTION = "Every rank outputs the whole LATENT reassembled in rank order."
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT",)}, "hidden": _HIDDEN_ID}

    def run(self, samples: Any, unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        return (distribute.gather_latents(comm, samples, self.tag(unique_id)),)


class ClusterFanOutMask(_ClusterNode):
    DESCRIPTION = "Split the leader's MASK batch over the ranks; each rank outputs its slice."
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"mask": _leader_input("MASK", "The whole batch.")},
            "optional": {"weights": _WEIGHTS},
            "hidden": _HIDDEN_ID,
        }

    def run(self, mask: Any = None, weights: str = "", unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        tag = self.tag(unique_id)
        if comm.size > 1 and mask is not None:
            mask = as_mask_batch(mask, tag)
        return (distribute.fan_out_batch(comm, mask, tag, weights),)


class ClusterFanInMask(_ClusterNode):
    DESCRIPTION = (
        "The leader outputs every rank's MASK slice concatenated in rank order; followers output "
        "their own slice."
    )
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"mask": ("MASK",)}, "hidden": _HIDDEN_ID}

    def run(self, mask: Any, unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        tag = self.tag(unique_id)
        if comm.size == 1:
            return (mask,)
        return (distribute.fan_in_batch(comm, as_mask_batch(mask, tag), tag),)


class ClusterGatherMasks(_ClusterNode):
    DESCRIPTION = "Every rank outputs every rank's MASK slice concatenated in rank order."
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"mask": ("MASK",)}, "hidden": _HIDDEN_ID}

    def run(self, mask: Any, unique_id: Any = None) -> tuple[Any]:
        comm = cluster.get_comm()
        tag = self.tag(unique_id)
        if comm.size == 1:
            return (mask,)
        return (distribute.gather_batch(comm, as_mask_batch(mask, tag), tag),)


# -- lists and batches (no communication) ---------------------------------------------------------
class ClusterGetInstanceWorkItemFromBatch(_Node):
    DESCRIPTION = (
        "This rank's share of a list, or of a batch every rank has, without any transfer. "
        "With as many items as ranks, rank r gets item (r + index_offset) mod world size."
    )
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("items",)
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "batch": (ANY,),
                "index_offset": ("INT", {"default": 0, "min": -(2**31), "max": 2**31 - 1}),
            },
            "optional": {"weights": _WEIGHTS},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> str:
        comm = cluster.get_comm()  # cached per (rank, size): recomputed if the world changes
        return f"{comm.rank}/{comm.size}"

    def run(
        self, batch: list[Any], index_offset: list[int], weights: list[str] | None = None
    ) -> tuple[list[Any]]:
        comm = cluster.get_comm()
        return (
            lists.instance_share(batch, comm.rank, comm.size, index_offset[0], _first(weights)),
        )


class ClusterSplitBatchToList(_Node):
    DESCRIPTION = "An IMAGE/MASK/LATENT batch as a list of one-item batches."
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("list",)
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"batch": (ANY,)}}

    def run(self, batch: Any) -> tuple[list[Any]]:
        return (lists.split_batch_to_list(batch),)


class ClusterFlattenBatchedImageList(_Node):
    DESCRIPTION = "A list of IMAGE batches (or nested lists) as a flat list of single images."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE",)}}

    def run(self, images: list[Any]) -> tuple[list[Any]]:
        return (lists.flatten(images),)


class ClusterInsertAtIndex(_Node):
    DESCRIPTION = (
        "Insert items before position `index` of a list (negative counts from the end); a single "
        "batch gets the other batch's items inserted."
    )
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("list",)
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "list": (ANY,),
                "item": (ANY,),
                "index": ("INT", {"default": 0, "min": -(2**31), "max": 2**31 - 1}),
            }
        }

    def run(self, list: list[Any], item: list[Any], index: list[int]) -> tuple[list[Any]]:
        return (lists.insert_at_index(list, item, index[0]),)


class ClusterStridedReorder(_Node):
    DESCRIPTION = (
        "Reorder a list (or a batch) taking every stride-th item: rank-major results become "
        "item-major with stride = items per rank."
    )
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("list",)
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "list": (ANY,),
                "stride": ("INT", {"default": 2, "min": 1, "max": 2**31 - 1}),
            }
        }

    def run(self, list: list[Any], stride: list[int]) -> tuple[list[Any]]:
        return (lists.strided_reorder(list, stride[0]),)


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None


_NODES: list[tuple[type[_Node], str]] = [
    (ClusterInfo, "Cluster Info"),
    (ClusterFreeNow, "Cluster Free Memory Now"),
    (ClusterFinallyFree, "Cluster Free Memory When Finished"),
    (ClusterExecuteWorkflow, "Cluster Execute Workflow"),
    (ClusterExecuteCurrentWorkflow, "Cluster Execute Current Workflow"),
    (ClusterStartSubgraph, "Cluster Start Subgraph"),
    (ClusterEndSubgraph, "Cluster End Subgraph"),
    (ClusterUseSubgraph, "Cluster Use Subgraph"),
    (ClusterBroadcastTensor, "Cluster Broadcast Tensor"),
    (ClusterListenTensorBroadcast, "Cluster Listen Tensor Broadcast"),
    (ClusterBroadcastLoadedImage, "Cluster Broadcast Loaded Image"),
    (ClusterFanOutImage, "Cluster Fan-Out Image"),
    (ClusterFanInImages, "Cluster Fan-In Images"),
    (ClusterGatherImages, "Cluster Gather Images"),
    (ClusterFanOutLatent, "Cluster Fan-Out Latent"),
    (ClusterFanInLatent, "Cluster Fan-In Latent"),
    (ClusterGatherLatents, "Cluster Gather Latents"),
    (ClusterFanOutMask, "Cluster Fan-Out Mask"),
    (ClusterFanInMask, "Cluster Fan-In Mask"),
    (ClusterGatherMasks, "Cluster Gather Masks"),
    (ClusterGetInstanceWorkItemFromBatch, "Cluster Get Instance Work Item From Batch"),
    (ClusterSplitBatchToList, "Cluster Split Batch To List"),
    (ClusterFlattenBatchedImageList, "Cluster Flatten Batched Image List"),
    (ClusterInsertAtIndex, "Cluster Insert At Index"),
    (ClusterStridedReorder, "Cluster Strided Reorder"),
]

NODE_CLASS_MAPPINGS: dict[str, type[Any]] = {cls.__name__: cls for cls, _ in _NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {cls.__name__: name for cls, name in _NODES}
