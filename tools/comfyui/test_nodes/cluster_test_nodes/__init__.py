"""Test-only ComfyUI nodes for the end-to-end tests and scaling benchmarks (never shipped).

- ``ZeroConditioning``: an all-zero SD1.x CONDITIONING, so KSampler runs without CLIP weights
  (the tiny models of tools/comfyui/make_tiny_sd.py have none).
- ``IndexedImages`` / ``SaveTensor``: distinct seeded images and masks in, exact tensors out (the
  end-to-end tests compare values bit for bit, which SaveImage's 8-bit PNGs cannot show).
- ``RecordRun``: passes an IMAGE through and leaves ``<name>.ran`` in the output folder: which
  ranks ran a node (followers must not evaluate what feeds a leader-only input).
- ``SleepPerImage``: passes an IMAGE batch through unchanged after sleeping
  ``seconds_per_image`` x batch size: a stand-in for per-image GPU work whose cost is known
  exactly, so a benchmark can tell the cluster's overhead from the work it spreads.

Load with ``comfycluster-launch comfyui --extra-custom-nodes tools/comfyui/test_nodes``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

CATEGORY = "cluster_test"


class ZeroConditioning:
    DESCRIPTION = "All-zero CONDITIONING shaped like CLIP-L output (SD1.x): tokens x width."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "tokens": ("INT", {"default": 77, "min": 1, "max": 4096}),
                "width": ("INT", {"default": 768, "min": 1, "max": 8192}),
            }
        }

    def run(self, tokens: int, width: int) -> tuple[list[list[Any]]]:
        # CONDITIONING is a list of [cross-attention tensor [B, tokens, width], options dict].
        return ([[torch.zeros(1, tokens, width), {}]],)


class SleepPerImage:
    DESCRIPTION = "Return the IMAGE batch unchanged after sleeping seconds_per_image per image."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE",),
                "seconds_per_image": (
                    "FLOAT",
                    {"default": 0.1, "min": 0.0, "max": 3600.0, "step": 0.001},
                ),
            }
        }

    def run(self, images: torch.Tensor, seconds_per_image: float) -> tuple[torch.Tensor]:
        # IMAGE is [batch, height, width, channels]; the sleep scales with this rank's share.
        time.sleep(seconds_per_image * int(images.shape[0]))
        return (images,)


class IndexedImages:
    DESCRIPTION = "A batch of distinct seeded images (and masks) with values 8 bits cannot hold."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "MASK")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "batch": ("INT", {"default": 6, "min": 1, "max": 4096}),
                "size": ("INT", {"default": 16, "min": 1, "max": 4096}),
                "dtype": (["float32", "float16", "bfloat16"],),
            }
        }

    def run(self, batch: int, size: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(batch * 1000 + size)
        images = torch.rand((batch, size, size, 3), generator=g).to(getattr(torch, dtype))
        masks = torch.rand((batch, size, size), generator=g)
        return (images, masks)


class SaveTensor:
    DESCRIPTION = "Write an IMAGE, MASK or LATENT exactly (safetensors) to the output folder."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    INPUT_IS_LIST = True  # a list of batches (list nodes' outputs) is saved as one batch

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("*",), "name": ("STRING", {"default": "tensor"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types: dict[str, Any]) -> bool:
        return True  # any type: IMAGE, MASK or LATENT

    def run(self, value: list[Any], name: list[str]) -> dict[str, Any]:
        import os

        import folder_paths
        from safetensors.torch import save_file

        value = value[0] if len(value) == 1 else torch.cat(value)
        if isinstance(value, dict):  # LATENT: every tensor entry, batch_index as a tensor
            tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
            if "batch_index" in value:
                tensors["batch_index"] = torch.tensor(value["batch_index"], dtype=torch.int64)
        else:
            tensors = {"value": value}
        path = os.path.join(folder_paths.get_output_directory(), f"{name[0]}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        return {"ui": {"tensors": [path]}}


class RecordRun:
    DESCRIPTION = "Return the IMAGE unchanged; leave <name>.ran in the output folder."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "run"})}}

    def run(self, images: torch.Tensor, name: str) -> tuple[torch.Tensor]:
        import os

        import folder_paths

        path = os.path.join(folder_paths.get_output_directory(), f"{name}.ran")
        with open(path, "a") as marker:
            marker.write("ran\n")
        return (images,)


class RankLocalModel:
    DESCRIPTION = (
        "Stands in for a model file only one instance has: its only valid choice names this "
        "instance's RANK, so a prompt made on the leader fails validation on every follower."
    )
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import os

        return {"required": {"model": ([f"model-of-rank-{os.environ.get('RANK', '0')}"],)}}

    def run(self, model: str) -> tuple[str]:
        return (model,)


NODE_CLASS_MAPPINGS = {
    "RankLocalModel": RankLocalModel,
    "RecordRun": RecordRun,
    "ZeroConditioning": ZeroConditioning,
    "SleepPerImage": SleepPerImage,
    "IndexedImages": IndexedImages,
    "SaveTensor": SaveTensor,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RankLocalModel": "Rank-local model (test)",
    "RecordRun": "Record run (test)",
    "ZeroConditioning": "Zero conditioning (test)",
    "SleepPerImage": "Sleep per image (test)",
    "IndexedImages": "Indexed images (test)",
    "SaveTensor": "Save tensor exactly (test)",
}
