"""The ``nccl`` backend: the gloo backend's machinery with NCCL for CUDA tensors.

Importing this module imports neither torch nor torch.distributed.
"""

from __future__ import annotations

from typing import ClassVar

from collectives.backends.base import register_backend
from collectives.backends.torch_dist import TorchBackend


class NcclBackend(TorchBackend):
    """torch.distributed with NCCL for CUDA tensors and gloo for CPU tensors and objects.

    One default group ``cpu:gloo,cuda:nccl``; rank ``r`` uses CUDA device ``LOCAL_RANK``.
    Waiting polls ``is_completed()`` (NCCL's ``wait(timeout)`` would tear down the communicator).
    """

    name: ClassVar[str] = "nccl"
    torch_backend: ClassVar[str] = "cpu:gloo,cuda:nccl"
    uses_cuda: ClassVar[bool] = True

    @classmethod
    def _missing(cls) -> str | None:
        missing = super()._missing()
        if missing is not None:
            return missing
        import torch
        import torch.distributed as dist

        if not dist.is_nccl_available():
            return "this torch build has no NCCL: install a CUDA build of torch"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        return None


register_backend("nccl", NcclBackend)

__all__ = ["NcclBackend"]
