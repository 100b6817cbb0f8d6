"""List and batch utilities (no communication)."""

from __future__ import annotations

from typing import Any

from . import cluster, lists
from .nodes_base import _WEIGHTS, ANY, _Node


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
        # Cached per (rank, size): recomputed if the world changes.
        comm = cluster.runtime().communicator()
        return f"{comm.rank}/{comm.size}"

    def run(
        self, batch: list[Any], index_offset: list[int], weights: list[str] | None = None
    ) -> tuple[list[Any]]:
        comm = self.runtime.communicator()
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
