"""Awkward payloads, made deterministically from a name and a rank, and exact comparison."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _seeded(rank: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * rank + salt)


def _randn(shape: tuple[int, ...], rank: int, salt: int) -> torch.Tensor:
    return torch.randn(shape, generator=_seeded(rank, salt))


PAYLOADS: dict[str, Callable[[int], Any]] = {
    "none": lambda r: None,
    "empty-bytes": lambda r: b"",
    "int": lambda r: 7 * r - 3,
    "str": lambda r: f"rank-{r}-\u00e9\u4e2d",
    "bytes": lambda r: bytes(range(r, r + 50)),
    "tensor-0d": lambda r: torch.tensor(float(r) + 0.5),
    "tensor-empty": lambda r: torch.empty(0, 3, dtype=torch.float16),
    "tensor-f32": lambda r: _randn((17, 5), r, 1),
    "tensor-bf16": lambda r: _randn((33,), r, 2).to(torch.bfloat16),
    "tensor-f16": lambda r: _randn((4, 4), r, 3).to(torch.float16),
    "tensor-f8": lambda r: _randn((9,), r, 4).to(torch.float8_e4m3fn),
    "tensor-bool": lambda r: _randn((11,), r, 5) > 0,
    "tensor-c64": lambda r: torch.complex(_randn((6,), r, 6), _randn((6,), r, 7)),
    "tensor-i64": lambda r: torch.arange(r, r + 10, dtype=torch.int64) * (1 << 40),
    "tensor-noncontig": lambda r: _randn((8, 6), r, 8).t()[:, ::2],
    "tensor-large": lambda r: _randn((1 << 20,), r, 9),  # 4 MiB
    "mixed-shape": lambda r: _randn((r + 1, 3), r, 10),
    "ndarray": lambda r: np.arange(12, dtype=np.float64).reshape(3, 4) * (r + 1),
    "nested": lambda r: {
        "rank": r,
        "t": _randn((3, 2), r, 11).to(torch.bfloat16),
        "items": [np.int32(r), (None, b"x" * r), {"deep": [_randn((2,), r, 12), "s"]}],
        3: (1.5, {"k": b"v"}),
    },
}


def payload(name: str, rank: int) -> Any:
    return PAYLOADS[name](rank)


def assert_same(got: Any, want: Any, where: str = "value") -> None:
    """Exact, dtype-aware equality: tensors must match bit for bit (NaN payloads included)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: expected a tensor, got {type(got)}"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        a = got.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        b = want.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), f"{where}: tensor bytes differ"
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: expected an ndarray, got {type(got)}"
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: dtype/shape differ"
        assert got.tobytes() == want.tobytes(), f"{where}: array bytes differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys differ"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"
