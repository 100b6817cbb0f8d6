"""Test-only ComfyUI nodes for the end-to-end tests and scaling benchmarks (never shipped).

- ``ZeroConditioning``: an all-zero SD1.x CONDITIONING, so KSampler runs without CLIP weights
  (the tiny models of tools/comfyui/make_tiny_sd.py have none).
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


NODE_CLASS_MAPPINGS = {"ZeroConditioning": ZeroConditioning, "SleepPerImage": SleepPerImage}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ZeroConditioning": "Zero conditioning (test)",
    "SleepPerImage": "Sleep per image (test)",
}
