"""The shared collective algorithms (collectives/algorithms) over the in-process backend.

Every rank's result is compared, byte for byte, with a reference computed here: values are
chosen so that sums and products are exact in every dtype (then any reduction order gives the
reference), and separately random floats check that every rank ends with the *same* bytes and
that the ring reduces each element in the order its module documents.  World sizes cover 1..9
(powers of two and not) and 16 and 33 ranks with small payloads; tensor sizes cover the small
(tree / recursive doubling) and large (ring / scatter + allgather) paths, sizes not divisible by
the world size and empty tensors.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collectives import Communicator
from collectives.algorithms import large_broadcast, ring_reduce
from collectives.errors import CollectivesError
from collectives.testing.spmd import run_threads

TIMEOUT = dict(timeout=120.0, op_timeout=60.0)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int64]
FLOAT_OPS = ["sum", "prod", "min", "max", "avg"]
INT_OPS = ["sum", "prod", "min", "max", "band", "bor", "bxor"]
# Just above the ring threshold at every size used with it here, and not divisible by them.
LARGE_NUMEL = {
    torch.float16: 140_003,
    torch.bfloat16: 140_003,
    torch.float32: 70_001,
    torch.int64: 35_003,
}
SMALL_NUMEL = 37


def _ops(dtype: torch.dtype) -> list[str]:
    return FLOAT_OPS if dtype.is_floating_point else INT_OPS


def _value(rank: int, numel: int, dtype: torch.dtype, op: str) -> torch.Tensor:
    """Rank ``rank``'s input: small integers, so that every order of reduction is exact."""
    i = torch.arange(numel, dtype=torch.int64)
    if op == "prod":
        v = (i + rank) % 2 + 1  # at most 2**9: exact in every dtype used
    elif op in ("min", "max"):
        v = (i * 7 + rank * 13) % 23 - 11
    else:
        v = (i * 5 + rank * 3) % 11
    return v.to(dtype)


def _reference(size: int, numel: int, dtype: torch.dtype, op: str) -> torch.Tensor:
    xs = torch.stack([_value(r, numel, dtype, op).to(torch.int64) for r in range(size)])
    if op in ("sum", "avg"):
        out = xs.sum(0)
    elif op == "prod":
        out = xs.prod(0)
    elif op == "min":
        out = xs.min(0).values
    elif op == "max":
        out = xs.max(0).values
    else:
        fn = {"band": torch.bitwise_and, "bor": torch.bitwise_or, "bxor": torch.bitwise_xor}[op]
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
    if op == "avg":
        return out.to(dtype).div_(size)  # the same exact sum, divided once in the dtype
    return out.to(dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(a.view(-1).view(torch.uint8).numpy())
        == bytes(b.view(-1).view(torch.uint8).numpy())
    )


def _run(size: int, fn: Any) -> list[Any]:
    return run_threads("local", size, fn, **TIMEOUT)


# -- allreduce ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", range(1, 10))
def test_allreduce_small_every_op_and_dtype(size: int) -> None:
    def fn(comm: Communicator) -> list[str]:
        bad = []
        for dtype in DTYPES:
            for op in _ops(dtype):
                t = _value(comm.rank, SMALL_NUMEL, dtype, op)
                comm.allreduce(t, op=op)
                if not _same_bytes(t, _reference(comm.size, SMALL_NUMEL, dtype, op)):
                    bad.append(f"{dtype} {op}")
        return bad

    assert _run(size, fn) == [[]] * size


@pytest.mark.parametrize("size", [2, 3, 4, 5, 7, 8])
def test_allreduce_large_every_op_and_dtype(size: int) -> None:
    def fn(comm: Communicator) -> list[str]:
        bad = []
        for dtype in DTYPES:
            numel = LARGE_NUMEL[dtype]
            assert ring_reduce.use_ring(numel * dtype.itemsize, comm.size)
            for op in _ops(dtype):
                t = _value(comm.rank, numel, dtype, op)
                comm.allreduce(t, op=op)
                if not _same_bytes(t, _reference(comm.size, numel, dtype, op)):
                    bad.append(f"{dtype} {op}")
        return bad

    assert _run(size, fn) == [[]] * size


def _random(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return (torch.randn(numel, generator=g, dtype=torch.float64) * 100).to(dtype)


def _ring_order(size: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """What ring_reduce documents: block b is ((x[b+1] + x[b+2]) + ...) + x[b], in the dtype."""
    xs = [_random(r, numel, dtype) for r in range(size)]
    out = torch.empty(numel, dtype=dtype)
    base, extra = divmod(numel, size)
    start = 0
    for b in range(size):
        stop = start + base + (b < extra)
        acc = xs[(b + 1) % size][start:stop].clone()
        for k in range(2, size + 1):
            acc += xs[(b + k) % size][start:stop]
        out[start:stop] = acc
        start = stop
    return out


@pytest.mark.parametrize("size", [3, 4, 6])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_allreduce_rounds_identically_on_every_rank(size: int, dtype: torch.dtype) -> None:
    """Random floats (order-dependent rounding): every rank holds the same bytes, the large
    path's bytes are exactly the documented ring order, and both paths are near the exact sum."""

    def fn(comm: Communicator) -> tuple[bytes, bytes]:
        small = _random(comm.rank, 1001, dtype)
        large = _random(comm.rank, LARGE_NUMEL[dtype], dtype)
        comm.allreduce(small, op="sum")
        comm.allreduce(large, op="sum")
        return bytes(small.view(torch.uint8).numpy()), bytes(large.view(torch.uint8).numpy())

    got = _run(size, fn)
    assert all(g == got[0] for g in got)
    large = torch.frombuffer(bytearray(got[0][1]), dtype=dtype)
    assert _same_bytes(large, _ring_order(size, LARGE_NUMEL[dtype], dtype))
    for numel, raw in ((1001, got[0][0]), (LARGE_NUMEL[dtype], got[0][1])):
        exact = sum(_random(r, numel, dtype).double() for r in range(size))
        result = torch.frombuffer(bytearray(raw), dtype=dtype).double()
        tol = 0.05 if dtype == torch.bfloat16 else 0.01
        assert torch.allclose(result, exact, rtol=tol, atol=tol * 100)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_allreduce_odd_dtypes_and_shapes(size: int) -> None:
    """bool, uint8, float8 (computed wide), a 2-d tensor and an empty tensor."""

    def fn(comm: Communicator) -> list[bool]:
        flags = torch.tensor([comm.rank == 0, False, True])
        comm.allreduce(flags, op="sum")
        u8 = torch.full((300_001,), comm.rank + 1, dtype=torch.uint8)  # large: ring
        comm.allreduce(u8, op="max")
        f8 = torch.full((5,), float(comm.rank), dtype=torch.float8_e4m3fn)
        comm.allreduce(f8, op="max")
        square = torch.arange(40, dtype=torch.float32).view(5, 8) + comm.rank
        comm.allreduce(square, op="sum")
        empty = torch.zeros(0, dtype=torch.float16)
        comm.allreduce(empty, op="sum")
        n = comm.size
        want = torch.arange(40, dtype=torch.float32).view(5, 8) * n + n * (n - 1) / 2
        return [
            flags.tolist() == [True, False, True],
            bool((u8 == n).all()),
            f8.float().tolist() == [float(n - 1)] * 5,
            _same_bytes(square, want),
            empty.numel() == 0,
        ]

    assert _run(size, fn) == [[True] * 5] * size


# -- reduce --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 9])
def test_reduce_small_and_large(size: int) -> None:
    def fn(comm: Communicator) -> list[str]:
        bad = []
        for numel in (SMALL_NUMEL, LARGE_NUMEL[torch.float32], 0):
            for op in ("sum", "max", "avg"):
                root = (numel + len(op)) % comm.size
                t = _value(comm.rank, numel, torch.float32, op)
                mine = t.clone()
                comm.reduce(t, root=root, op=op)
                want = _reference(comm.size, numel, torch.float32, op)
                if comm.rank == root and not _same_bytes(t, want):
                    bad.append(f"{numel} {op} result")
                if comm.rank != root and not _same_bytes(t, mine):
                    bad.append(f"{numel} {op} non-root tensor changed")
        return bad

    assert _run(size, fn) == [[]] * size


# -- broadcast -------------------------------------------------------------------------------------
def _payload(root: int, scale: int) -> dict[str, Any]:
    """An object message with a header and several buffers of uneven sizes."""
    return {
        "root": root,
        "a": torch.arange(scale, dtype=torch.float32) + root,
        "b": bytes(range(256)) * (scale // 512 + 1),
        "c": [torch.full((3, 7), root, dtype=torch.int64), "text", 1.5],
        "d": torch.ones(scale // 3 + 1, dtype=torch.bfloat16) * root,
    }


def _payload_equal(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and _same_bytes(got, want)
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_payload_equal(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(map(_payload_equal, got, want))
    return bool(got == want)


@pytest.mark.parametrize("size", range(1, 10))
def test_broadcast_objects_small_and_large(size: int) -> None:
    def fn(comm: Communicator) -> list[str]:
        bad = []
        for scale in (10, 200_000):  # ~40 B / ~1.2 MB of buffers
            for root in {0, comm.size - 1, comm.size // 2}:
                got = comm.broadcast(_payload(root, scale) if comm.rank == root else None, root)
                if not _payload_equal(got, _payload(root, scale)):
                    bad.append(f"scale={scale} root={root}")
        return bad

    assert _run(size, fn) == [[]] * size


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 9])
def test_broadcast_into_small_large_and_empty(size: int) -> None:
    def fn(comm: Communicator) -> list[str]:
        bad = []
        for numel in (0, 5, 65_536, 300_007):  # 65,536 x 4 bytes: a payload of exactly the head
            for root in {0, comm.size - 1}:
                want = torch.arange(numel, dtype=torch.float32) * 3 + root
                buf = want.clone() if comm.rank == root else torch.full_like(want, -1)
                assert comm.broadcast_into(buf, root=root) is buf
                if not _same_bytes(buf, want):
                    bad.append(f"numel={numel} root={root}")
        return bad

    assert _run(size, fn) == [[]] * size


@pytest.mark.parametrize("size", [3, 4, 5, 7])
def test_broadcast_messages_around_the_head_size(size: int) -> None:
    """Bytes messages whose total size (codec header included) is just below, at and just
    above HEAD_BYTES: the first takes the tree, the others the large path (above
    TREE_MAX_RANKS ranks; with fewer all go down the tree), and all arrive."""
    overhead = len(_encoded_header(b""))

    def fn(comm: Communicator) -> list[bool]:
        out = []
        for total in (
            large_broadcast.HEAD_BYTES - 1,
            large_broadcast.HEAD_BYTES,
            large_broadcast.HEAD_BYTES + 9,
        ):
            want = bytes([total % 251]) * (total - overhead)
            got = comm.broadcast(want if comm.rank == 1 else None, root=1)
            out.append(got == want)
        return out

    assert _run(size, fn) == [[True] * 3] * size


def _encoded_header(obj: object) -> bytes:
    from collectives.codec import encode

    return encode(obj).header


def test_broadcast_into_of_different_sizes_fails_instead_of_hanging() -> None:
    """A large broadcast_into where one rank's buffer is larger than the root's: that rank
    raises (it cannot land the payload), nobody waits for the op timeout's end and hangs."""

    def fn(comm: Communicator) -> str:
        numel = 300_000 + (1000 if comm.rank == 2 else 0)
        buf = torch.zeros(numel, dtype=torch.float32)
        try:
            comm.broadcast_into(buf, root=0, timeout=20)
        except CollectivesError as err:
            return type(err).__name__
        return "ok"

    got = run_threads("local", 3, fn, timeout=60.0, op_timeout=20.0)
    assert got[2] != "ok"


# -- rootless and rooted data movement -------------------------------------------------------------
@pytest.mark.parametrize("size", range(1, 10))
def test_gather_scatter_allgather_barrier(size: int) -> None:
    def fn(comm: Communicator) -> list[bool]:
        n, r = comm.size, comm.rank
        root = n - 1
        gathered = comm.gather({"r": r}, root=root)
        scattered = comm.scatter([f"x{i}" for i in range(n)] if r == root else None, root=root)
        everyone = comm.allgather(torch.full((r + 1,), r))
        out = torch.empty(n, 4, dtype=torch.int64)
        comm.allgather_into(out, torch.full((4,), r, dtype=torch.int64))
        comm.barrier()
        return [
            gathered == ([{"r": i} for i in range(n)] if r == root else None),
            scattered == f"x{r}",
            all(_same_bytes(everyone[i], torch.full((i + 1,), i)) for i in range(n)),
            _same_bytes(out, torch.arange(n).repeat_interleave(4).view(n, 4)),
        ]

    assert _run(size, fn) == [[True] * 4] * size


@pytest.mark.parametrize("size", [16, 33])
def test_many_ranks_small_payloads(size: int) -> None:
    def fn(comm: Communicator) -> list[str]:
        bad = []
        for dtype in (torch.float32, torch.int64):
            for op in _ops(dtype):
                t = _value(comm.rank, 11, dtype, op)
                comm.allreduce(t, op=op)
                if not _same_bytes(t, _reference(comm.size, 11, dtype, op)):
                    bad.append(f"allreduce {dtype} {op}")
        root = comm.size - 2
        got = comm.broadcast(_payload(root, 10) if comm.rank == root else None, root=root)
        if not _payload_equal(got, _payload(root, 10)):
            bad.append("broadcast")
        if comm.allgather(comm.rank) != list(range(comm.size)):
            bad.append("allgather")
        t = _value(comm.rank, 9, torch.float32, "sum")
        comm.reduce(t, root=3, op="sum")
        if comm.rank == 3 and not _same_bytes(t, _reference(comm.size, 9, torch.float32, "sum")):
            bad.append("reduce")
        comm.barrier()
        return bad

    assert _run(size, fn) == [[]] * size


def test_many_ranks_large_broadcast() -> None:
    """16 ranks on the large path: tails of ~26 KB (small blocks) and of 11 bytes (most of the
    16 blocks empty)."""
    overhead = len(_encoded_header(b""))

    def fn(comm: Communicator) -> list[bool]:
        out = []
        for total in (282_000, large_broadcast.HEAD_BYTES + 3):
            want = (bytes(range(256)) * (total // 256 + 1))[: total - overhead]
            got = comm.broadcast(want if comm.rank == 5 else None, root=5)
            out.append(got == want)
        return out

    assert _run(16, fn) == [[True, True]] * 16


# -- the torch backend's fallbacks: the same algorithms on a link that sends by reference --------
def _gloo_large_fallbacks(comm: Communicator) -> list[bool]:
    """float8 has no gloo reduction, so allreduce/reduce take the shared ring; objects always
    take the shared broadcast.  The torch link sends buffers by reference until the op ends,
    so any algorithm that wrote a buffer after sending it would corrupt a peer's result here."""
    n = comm.size
    f8 = torch.full((400_003,), float(comm.rank), dtype=torch.float8_e4m3fn)  # ring
    comm.allreduce(f8, op="max")
    red = torch.full((400_003,), float(comm.rank + 1), dtype=torch.float8_e4m3fn)
    comm.reduce(red, root=n - 1, op="max")
    got = comm.broadcast(_payload(1, 200_000) if comm.rank == 1 else None, root=1)
    return [
        bool((f8.float() == n - 1).all()),
        comm.rank != n - 1 or bool((red.float() == n).all()),
        _payload_equal(got, _payload(1, 200_000)),
    ]


@pytest.mark.gloo
@pytest.mark.parametrize("size", [3, 4])
def test_gloo_fallbacks_use_the_large_paths(size: int) -> None:
    from collectives.testing.spmd import run_spmd

    assert run_spmd("gloo", size, _gloo_large_fallbacks, **TIMEOUT) == [[True] * 3] * size
