"""The V1 ComfyUI node classes: thin adapters over the plain modules of this package.

Every rank runs the same workflow (SPMD), and the n-th collective of one rank meets the n-th of
every other.  So nodes that communicate ("cluster" nodes) are never served from ComfyUI's cache
(``NOT_IDEMPOTENT`` and an ``IS_CHANGED`` never equal to itself), and no input is evaluated on
some ranks only: ComfyUI's execution order depends on which nodes run, and it must be the same on
every rank.  Inputs only the leader uses are computed everywhere and ignored on followers.
See docs/nodes.md for what each node does on each rank.
"""

from __future__ import annotations

from typing import Any

from . import cluster_info, distribute, memory
from . import images as image_files
from .distribute import LOSSLESS
from .nodes_base import (
    _CODEC,
    _HIDDEN_ID,
    _WEIGHTS,
    ANY,
    _ClusterNode,
    _FromLeader,
    _leader_input,
    _Node,
)
from .nodes_lists import (
    ClusterFlattenBatchedImageList,
    ClusterGetInstanceWorkItemFromBatch,
    ClusterInsertAtIndex,
    ClusterSplitBatchToList,
    ClusterStridedReorder,
)
from .nodes_sync import ClusterSync
from .nodes_workflow import (
    ClusterEndSubgraph,
    ClusterExecuteCurrentWorkflow,
    ClusterExecuteWorkflow,
    ClusterStartSubgraph,
    ClusterUseSubgraph,
)
from .tensors import as_mask_batch


# -- cluster management ---------------------------------------------------------------------------
class ClusterInfo(_ClusterNode):
    DESCRIPTION = (
        "This rank, the world size, the backend, every peer's health and path, and the "
        "doctor's problems on this machine."
    )
    RETURN_TYPES = ("STRING", "INT", "INT", "INT")
    RETURN_NAMES = ("info", "rank", "world_size", "connected")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}, "optional": {"trigger": (ANY,)}}

    def run(self, trigger: Any = None) -> dict[str, Any]:
        comm = self.runtime.communicator()
        status = self.runtime.status(comm)
        # Each peer's path, and the doctor's problems on this machine (bounded: cluster_info).
        text = cluster_info.info_text(status, comm)
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


# -- broadcast ------------------------------------------------------------------------------------
class ClusterBroadcastTensor(_FromLeader):
    LEADER_INPUTS = ("tensor",)
    DESCRIPTION = (
        "The leader's value (IMAGE, LATENT, MASK or anything else) on every rank, batch "
        "dimension kept. Followers do not evaluate their input (it is lazy)."
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
        comm = self.runtime.communicator()
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
                        "tooltip": "A file name in the leader's ComfyUI input folder (as "
                        "LoadImage takes it; [output] / [temp] annotations allowed), not a path.",
                    },
                )
            },
            "optional": {"codec": _CODEC},
            "hidden": _HIDDEN_ID,
        }

    def run(self, image: str, codec: str = LOSSLESS, unique_id: Any = None) -> tuple[Any, Any]:
        comm = self.runtime.communicator()
        return distribute.broadcast_loaded(
            comm,
            lambda: image_files.load_image(
                image_files.resolve_image_path(image, type(self).__name__)
            ),
            self.tag(unique_id),
            codec,
        )


# -- fan-out / fan-in / gather --------------------------------------------------------------------
class ClusterFanOutImage(_FromLeader):
    LEADER_INPUTS = ("image",)
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
        comm = self.runtime.communicator()
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
        comm = self.runtime.communicator()
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
        comm = self.runtime.communicator()
        return (distribute.gather_batch(comm, images, self.tag(unique_id), codec),)


class ClusterFanOutLatent(_FromLeader):
    LEADER_INPUTS = ("samples",)
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
        comm = self.runtime.communicator()
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
        comm = self.runtime.communicator()
        return (distribute.fan_in_latent(comm, samples, self.tag(unique_id)),)


class ClusterGatherLatents(_ClusterNode):
    DESCRIPTION = "Every rank outputs the whole LATENT reassembled in rank order."
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT",)}, "hidden": _HIDDEN_ID}

    def run(self, samples: Any, unique_id: Any = None) -> tuple[Any]:
        comm = self.runtime.communicator()
        return (distribute.gather_latents(comm, samples, self.tag(unique_id)),)


class ClusterFanOutMask(_FromLeader):
    LEADER_INPUTS = ("mask",)
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
        comm = self.runtime.communicator()
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
        comm = self.runtime.communicator()
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
        comm = self.runtime.communicator()
        tag = self.tag(unique_id)
        if comm.size == 1:
            return (mask,)
        return (distribute.gather_batch(comm, as_mask_batch(mask, tag), tag),)


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
    (ClusterSync, "Cluster Sync (internal)"),
]

NODE_CLASS_MAPPINGS: dict[str, type[Any]] = {cls.__name__: cls for cls, _ in _NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {cls.__name__: name for cls, name in _NODES}
