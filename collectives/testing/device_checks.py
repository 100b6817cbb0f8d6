"""Conformance checks with tensors on a given device: every op, in place and through objects.

The main suite (:mod:`collectives.testing.conformance`) runs on CPU tensors.  These checks run
the same ops on tensors that live on ``device`` (a CUDA device where one exists) and assert what
users of a GPU cluster rely on: results are bit-exact, in-place ops write into the caller's
tensor on its own device, and tensors sent through the object API come back on the device they
left from (the codec records the device index).  On the CPU they double as a check of the checks.

    comfycluster-launch --nproc 2 --backend gloo -- \\
        python -m collectives.testing.runner --device cuda --out DIR
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from collectives.communicator import Communicator
from collectives.testing.conformance import (
    _BUFFER_DTYPES,
    _REDUCE_DTYPES,
    _block,
    _ints,
    _reference,
)
from collectives.testing.payloads import assert_same

DeviceCheck = Callable[[Communicator, torch.device], None]
DEVICE_CHECKS: dict[str, DeviceCheck] = {}


def device_check(fn: DeviceCheck) -> DeviceCheck:
    DEVICE_CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def rank_device(kind: str, rank: int) -> torch.device:
    """The device a rank's tensors live on: ``cuda`` means the rank's GPU, round robin."""
    if kind == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("device checks on cuda need a visible CUDA device")
    return torch.device("cuda", rank % count)


def _on(t: torch.Tensor, device: torch.device, where: str) -> None:
    assert t.device == device, f"{where}: the result is on {t.device}, not {device}"


def _objects(rank: int, device: torch.device) -> dict[str, object]:
    """Awkward tensors on ``device`` inside one Python object."""
    g = torch.Generator().manual_seed(77 + rank)
    base = torch.randn(6, 8, generator=g)
    return {
        "rank": rank,
        "bf16": base.to(torch.bfloat16).to(device),
        "f16": base.to(torch.float16).to(device),
        "f8": base.to(torch.float8_e5m2).to(device),
        "noncontig": base.to(device).t()[::2],
        "scalar": torch.tensor(rank + 0.25, device=device),
        "empty": torch.empty(0, 4, device=device, dtype=torch.int16),
        "large": torch.full((1 << 20,), float(rank), device=device),  # 4 MiB
    }


def _assert_objects(got: object, rank: int, device: torch.device, where: str) -> None:
    want = _objects(rank, device)
    assert_same(got, want, where)
    assert isinstance(got, dict)
    for key, value in got.items():
        if isinstance(value, torch.Tensor):
            _on(value, device, f"{where}[{key!r}]")


# -- object API ------------------------------------------------------------------------------------
@device_check
def check_objects(comm: Communicator, device: torch.device) -> None:
    size, rank = comm.size, comm.rank
    for root in range(size):
        got = comm.broadcast(_objects(root, device) if rank == root else None, root=root)
        _assert_objects(got, root, device, f"broadcast(root={root})")
        items = [_objects(r, device) for r in range(size)] if rank == root else None
        _assert_objects(comm.scatter(items, root=root), rank, device, f"scatter(root={root})")
        gathered = comm.gather(_objects(rank, device), root=root)
        if rank == root:
            assert isinstance(gathered, list)
            for r, item in enumerate(gathered):
                _assert_objects(item, r, device, f"gather(root={root})[{r}]")
    for r, item in enumerate(comm.allgather(_objects(rank, device))):
        _assert_objects(item, r, device, f"allgather[{r}]")
    if size > 1:
        right, left = (rank + 1) % size, (rank - 1) % size
        work = comm.isend(_objects(rank, device), right)
        _assert_objects(comm.recv(left), left, device, f"recv from {left}")
        work.wait()


# -- in-place API ----------------------------------------------------------------------------------
@device_check
def check_allreduce(comm: Communicator, device: torch.device) -> None:
    for dtype in _REDUCE_DTYPES:
        for op in ("sum", "prod", "min", "max", "avg"):
            if op == "avg" and not dtype.is_floating_point:
                continue
            t = _ints(comm.rank, dtype).to(device)
            assert comm.allreduce(t, op=op) is t
            _on(t, device, f"allreduce({dtype}, {op})")
            assert_same(t.cpu(), _reference(comm.size, dtype, op), f"allreduce({dtype}, {op})")
    f8 = _ints(comm.rank, torch.float8_e4m3fn).to(device)
    comm.allreduce(f8, op="max")
    assert_same(f8.cpu(), _reference(comm.size, torch.float8_e4m3fn, "max"), "allreduce(f8)")
    flags = torch.tensor([comm.rank == 0, True, False], device=device)
    comm.allreduce(flags, op="sum")
    assert flags.tolist() == [True, True, False], "bool sum is logical or"
    big = torch.full((1 << 20,), float(comm.rank + 1), device=device)
    comm.iallreduce(big, op="sum").wait(timeout=120)
    _on(big, device, "iallreduce(4 MiB)")
    want = float(comm.size * (comm.size + 1) // 2)
    assert bool((big == want).all()), "iallreduce(4 MiB) on the device"


@device_check
def check_reduce(comm: Communicator, device: torch.device) -> None:
    for root in range(comm.size):
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            t = _ints(comm.rank, dtype).to(device)
            got = comm.reduce(t, root=root, op="sum")
            if comm.rank == root:
                assert got is t
                _on(t, device, f"reduce({dtype}, root={root})")
                want = _reference(comm.size, dtype, "sum")
                assert_same(t.cpu(), want, f"reduce({dtype}, root={root})")
            else:
                assert got is None


@device_check
def check_broadcast_into(comm: Communicator, device: torch.device) -> None:
    for root in range(comm.size):
        for dtype in _BUFFER_DTYPES:
            buf = _block(comm.rank, dtype).to(device)
            assert comm.broadcast_into(buf, root=root) is buf
            _on(buf, device, f"broadcast_into({dtype})")
            assert_same(buf.cpu(), _block(root, dtype), f"broadcast_into({dtype}, root={root})")
    big = torch.full((1 << 20,), float(comm.rank), device=device)
    comm.broadcast_into(big, root=comm.size - 1)
    assert bool((big == comm.size - 1).all()), "broadcast_into(4 MiB) on the device"


@device_check
def check_gather_into(comm: Communicator, device: torch.device) -> None:
    for root in range(comm.size):
        for dtype in _BUFFER_DTYPES:
            is_root = comm.rank == root
            out = torch.zeros((comm.size, 3, 5), dtype=dtype, device=device) if is_root else None
            got = comm.gather_into(out, _block(comm.rank, dtype).to(device), root=root)
            if out is None:
                assert got is None
                continue
            _on(out, device, f"gather_into({dtype})")
            want = torch.stack([_block(r, dtype) for r in range(comm.size)])
            assert_same(out.cpu(), want, f"gather_into({dtype}, root={root})")
            assert got is out


@device_check
def check_allgather_into(comm: Communicator, device: torch.device) -> None:
    for dtype in _BUFFER_DTYPES:
        out = torch.zeros((comm.size * 3, 5), dtype=dtype, device=device)
        comm.allgather_into(out, _block(comm.rank, dtype).to(device))
        _on(out, device, f"allgather_into({dtype})")
        want = torch.cat([_block(r, dtype) for r in range(comm.size)])
        assert_same(out.cpu(), want, f"allgather_into({dtype})")


@device_check
def check_scatter_into(comm: Communicator, device: torch.device) -> None:
    for root in range(comm.size):
        for dtype in _BUFFER_DTYPES:
            src = None
            if comm.rank == root:
                src = torch.stack([_block(r, dtype) for r in range(comm.size)]).to(device)
            out = torch.zeros((3, 5), dtype=dtype, device=device)
            assert comm.scatter_into(out, src, root=root) is out
            _on(out, device, f"scatter_into({dtype})")
            assert_same(out.cpu(), _block(comm.rank, dtype), f"scatter_into({dtype}, root={root})")


@device_check
def check_send_buffer(comm: Communicator, device: torch.device) -> None:
    if comm.size == 1:
        return
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    for tag, dtype in enumerate(_BUFFER_DTYPES):
        work = comm.isend_buffer(_block(comm.rank, dtype).to(device), right, tag=tag)
        out = torch.empty((3, 5), dtype=dtype, device=device)
        comm.recv_into(out, left, tag=tag)
        work.wait()
        _on(out, device, f"recv_into({dtype})")
        assert_same(out.cpu(), _block(left, dtype), f"recv_into({dtype})")


def bound(fn: DeviceCheck, device: torch.device) -> Callable[[Communicator], None]:
    """``fn`` with its device filled in: a check of one communicator, like the CPU suite's."""

    def run(comm: Communicator) -> None:
        fn(comm, device)

    return run


def run_device_checks(comm: Communicator, device: torch.device) -> None:
    """Every device check, in order (what the in-process tests call on each rank)."""
    for fn in DEVICE_CHECKS.values():
        fn(comm, device)


__all__ = ["DEVICE_CHECKS", "bound", "rank_device", "run_device_checks"]
