"""Run node logic as an SPMD program on in-process ranks, each thread with its own communicator."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from collectives import Communicator
from collectives.testing import run_local
from comfy_nodes.cluster import comm_override
from comfy_nodes.server.settings import Settings

T = TypeVar("T")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def spmd(
    size: int, fn: Callable[[Communicator], T], *, op_timeout: float = 30.0, **init_kwargs: Any
) -> list[T]:
    """``fn(comm)`` on ``size`` ranks, with ``comm`` installed as each rank's cluster comm."""

    def rank_main(comm: Communicator) -> T:
        with comm_override(comm):
            return fn(comm)

    return run_local(size, rank_main, timeout=90.0, op_timeout=op_timeout, **init_kwargs)


def images(batch: int, dtype: torch.dtype = torch.float32, h: int = 3, w: int = 5) -> torch.Tensor:
    """A distinct, seeded IMAGE batch whose items can be told apart."""
    g = torch.Generator().manual_seed(1234 + batch)
    return torch.rand((batch, h, w, 3), generator=g).to(dtype)


def run_node(name: str, *args: Any, **kwargs: Any) -> Any:
    """Call a node the way ComfyUI does: instantiate, then call FUNCTION."""
    from comfy_nodes import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)(*args, **kwargs)


def local_settings(rank: int = 1, size: int = 2, **changes: Any) -> Settings:
    """A rank's cluster settings on the ``local`` backend with short timeouts and no leader URL
    (no HTTP), for membership tests; ``changes`` overrides any field."""
    settings = Settings(
        rank=rank,
        size=size,
        backend="local",
        op_timeout=5.0,
        join_timeout=5.0,
        idle_timeout=5.0,
        leader_url=None,
        advertise_host="127.0.0.1",
    )
    return dataclasses.replace(settings, **changes)
