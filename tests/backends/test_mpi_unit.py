"""Unit tests of the mpi backend: this file is also the script each rank runs under mpiexec.

    mpiexec -n 2 python tests/backends/test_mpi_unit.py dtypes

Each scenario asserts on every rank and exits non-zero on the first failure (mpiexec then ends
the job); the pytest side starts the world and checks the exit code and output.  The conformance
suite (tests/conformance/test_mpi.py) covers every op x root x payload; these cover what is
specific to this backend: the dtype table and the hand-made reductions, long codec headers, the
direct gather/scatter path, deadlines, cancellation, abort and mismatched calls.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from mpi_fast_scenarios import SLACK_S, abort_fails_pending, fast_paths

ROOT = Path(__file__).resolve().parents[2]


# -- pytest side -----------------------------------------------------------------------------------
def _mpiexec() -> str | None:
    from collectives.errors import BackendUnavailableError
    from collectives.testing.spmd import mpiexec

    try:
        return mpiexec()
    except BackendUnavailableError:
        return None


@functools.cache
def _world(n: int, scenarios: str, extra_env: tuple[tuple[str, str], ...] = ()) -> tuple[int, str]:
    """Run ``scenarios`` (comma-separated, in order) in one ``mpiexec -n n`` job."""
    return _mpiexec_job(["-n", str(n), sys.executable, __file__, scenarios], dict(extra_env))


def _mpiexec_job(args: list[str], extra_env: dict[str, str] | None = None) -> tuple[int, str]:
    """``mpiexec ARGS`` with this checkout importable: the exit code and the whole output."""
    mpiexec = _mpiexec()
    assert mpiexec is not None, "mpiexec not found: pip install mpi4py mpich (setup.sh does)"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra_env or {}))
    proc = subprocess.run(
        [mpiexec, *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _check(n: int, scenario: str) -> None:
    importlib.import_module("mpi4py")  # installed by setup.sh: fail if absent
    code, log = _world(n, WORLDS[n])
    for rank in range(n):
        assert f"rank {rank} {scenario} ok" in log, f"exit code {code}\n{log[-6000:]}"


WORLDS = {
    2: "dtypes,mismatch,fast_paths,deadline,tuning,broadcast_plan",
    3: "dtypes,mismatch,fast_paths,broadcast_sizes,tuning,broadcast_plan",
    4: "broadcast_sizes,tuning,tuning,broadcast_plan",
}
SPREAD = (("COMFY_CLUSTER_MPI_BROADCAST", "scatter_allgather"),)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_dtypes_and_payloads(n: int) -> None:
    _check(n, "dtypes")


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_mismatch(n: int) -> None:
    _check(n, "mismatch")


@pytest.mark.mpi
@pytest.mark.parametrize("n", [3, 4])
def test_broadcast_tree_sizes(n: int) -> None:
    _check(n, "broadcast_sizes")


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_allgather_algorithm_tuning(n: int) -> None:
    """4 ranks of one host get MPICH's recursive-doubling iallgather (twice: a second world of
    the same process too); 2 and 3 ranks keep MPICH's choice; allgather stays bit-exact."""
    _check(n, "tuning")


@pytest.mark.mpi
def test_allgather_algorithm_tuning_off() -> None:
    importlib.import_module("mpi4py")
    code, log = _world(4, "tuning_off", (("COMFY_CLUSTER_MPI_TUNING", "0"),))
    for rank in range(4):
        assert f"rank {rank} tuning_off ok" in log, f"exit code {code}\n{log[-6000:]}"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_broadcast_plan_follows_cores_per_rank(n: int) -> None:
    """Ranks that outnumber their host's CPUs broadcast down a tree, else scatter + allgather."""
    _check(n, "broadcast_plan")


@pytest.mark.mpi
@pytest.mark.parametrize("n", [3, 4])
def test_broadcast_scatter_allgather(n: int) -> None:
    """The scatter + allgather broadcast (the plan on hosts with a core per rank), forced here:
    bit-exact from every root, and a wrong-sized buffer named as a mismatch."""
    importlib.import_module("mpi4py")
    code, log = _world(n, "broadcast_sizes,broadcast_plan", SPREAD)
    for rank in range(n):
        for scenario in ("broadcast_sizes", "broadcast_plan"):
            assert f"rank {rank} {scenario} ok" in log, f"exit code {code}\n{log[-6000:]}"


@pytest.mark.mpi
def test_broadcast_plan_must_agree() -> None:
    """Ranks given different COMFY_CLUSTER_MPI_BROADCAST values refuse to start, all of them."""
    cmd = [sys.executable, __file__, "refused"]
    tree = ["-n", "1", "-env", "COMFY_CLUSTER_MPI_BROADCAST", "tree", *cmd]
    native = ["-n", "1", "-env", "COMFY_CLUSTER_MPI_BROADCAST", "native", *cmd]
    code, log = _mpiexec_job([*tree, ":", *native])
    assert code == 0, log[-6000:]
    for rank in range(2):
        assert f"rank {rank} refused ok" in log, log[-6000:]


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_fast_paths(n: int) -> None:
    _check(n, "fast_paths")


def test_deadline_cancel_abort() -> None:
    _check(2, "deadline")


# -- worker side (runs under mpiexec) --------------------------------------------------------------
def _dtypes(comm: object) -> None:
    import torch

    from collectives.backends.mpi import DIRECT_MIN_BYTES, MPIBackend
    from collectives.communicator import Communicator
    from collectives.errors import CollectiveMismatchError, ConfigurationError
    from collectives.reduce_op import ReduceOp, combine_, finish_
    from collectives.testing.payloads import assert_same

    assert isinstance(comm, Communicator)
    rank, size = comm.rank, comm.size

    def same_everywhere(t: torch.Tensor, where: str) -> None:
        mine = t.contiguous().view(-1).view(torch.uint8).clone()
        for r, other in enumerate(comm.allgather(mine)):
            assert torch.equal(other, mine), f"{where}: rank {r} has different bits"

    def inputs(dtype: torch.dtype, n: int, r: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(17 * r + n)
        if dtype == torch.bool:
            return torch.rand(n, generator=g) > 0.5
        if dtype.is_floating_point or dtype.is_complex:
            return (torch.randn(n, generator=g) * 3).to(dtype)
        return torch.randint(-50 if dtype.is_signed else 0, 50, (n,), generator=g).to(dtype)

    def reference(dtype: torch.dtype, n: int, op: ReduceOp) -> torch.Tensor:
        acc = inputs(dtype, n, 0).clone()
        for r in range(1, size):
            combine_(acc, inputs(dtype, n, r), op)
        finish_(acc, op, size)
        return acc

    # Types MPI cannot reduce: reduce-scatter by hand, rank-ordered, bit-identical.
    fallback = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
    for dtype in fallback:
        for op in (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.MAX, ReduceOp.MIN, ReduceOp.PROD):
            for n in (1, size - 1, 7, 1000):  # fewer elements than ranks: empty segments
                t = inputs(dtype, n, rank)
                comm.allreduce(t, op=op)
                where = f"allreduce({dtype}, {op.value}, n={n})"
                assert_same(t, reference(dtype, n, op), where)
                same_everywhere(t, where)
            t = inputs(dtype, 33, rank)
            before = t.clone()
            comm.reduce(t, root=size - 1, op=op)
            if rank == size - 1:
                assert_same(t, reference(dtype, 33, op), f"reduce({dtype}, {op.value})")
            else:
                assert_same(t, before, "fallback reduce leaves non-roots unchanged")
    # Types MPI reduces natively.
    native = [torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64]
    native += [torch.uint8, torch.complex64, torch.complex128]
    for dtype in native:
        ops = [ReduceOp.SUM, ReduceOp.PROD]
        if not dtype.is_complex:
            ops += [ReduceOp.MIN, ReduceOp.MAX]
        if not (dtype.is_floating_point or dtype.is_complex):
            ops += [ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR]
        for op in ops:
            t = inputs(dtype, 257, rank)
            comm.allreduce(t, op=op)
            where = f"allreduce({dtype}, {op.value})"
            same_everywhere(t, where)
            if not (dtype.is_floating_point or dtype.is_complex):  # exact: order-independent
                assert_same(t, reference(dtype, 257, op), where)
            else:
                want = reference(torch.float64 if dtype.is_floating_point else dtype, 257, op)
                assert torch.allclose(t.to(want.dtype), want, rtol=1e-4, atol=1e-3), where
    for op in (ReduceOp.SUM, ReduceOp.PROD, ReduceOp.BXOR, ReduceOp.MIN):
        flags = inputs(torch.bool, 64, rank)
        comm.allreduce(flags, op=op)
        assert_same(flags, reference(torch.bool, 64, op), f"allreduce(bool, {op.value})")
    avg = torch.full((10,), float(rank), dtype=torch.float64)
    comm.allreduce(avg, op="avg")
    assert bool((avg == sum(range(size)) / size).all())

    # Every dtype of the codec table moves bit-exactly through the buffer API.
    moving = fallback + native + [torch.bool, torch.complex32, torch.float8_e5m2fnuz]
    moving += [getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)]
    for dtype in moving:
        for shape in ((), (0,), (3, 5)):
            blocks = [inputs(dtype, _numel(shape), r).reshape(shape) for r in range(size)]
            t = blocks[rank].clone()
            comm.broadcast_into(t, root=0)
            assert_same(t, blocks[0], f"broadcast_into({dtype}, {shape})")
            out = torch.zeros((size, *shape), dtype=dtype)
            comm.allgather_into(out, blocks[rank])
            assert_same(out, torch.stack(blocks), f"allgather_into({dtype}, {shape})")
            root = size - 1
            gathered = torch.zeros((size, *shape), dtype=dtype) if rank == root else None
            comm.gather_into(gathered, blocks[rank], root=root)
            if rank == root:
                assert_same(gathered, torch.stack(blocks), f"gather_into({dtype}, {shape})")
            got = torch.zeros(shape, dtype=dtype)
            comm.scatter_into(got, torch.stack(blocks) if rank == root else None, root=root)
            assert_same(got, blocks[rank], f"scatter_into({dtype}, {shape})")
            right, left = (rank + 1) % size, (rank - 1) % size
            work = comm.isend_buffer(blocks[rank], right, tag=3)
            recv = torch.zeros(shape, dtype=dtype)
            comm.recv_into(recv, left, tag=3)
            work.wait()
            assert_same(recv, blocks[left], f"recv_into({dtype}, {shape})")

    # Direct (point-to-point) gather/scatter for big blocks, every root.
    n_big = DIRECT_MIN_BYTES // 4 + 3
    for root in range(size):
        mine = torch.arange(n_big, dtype=torch.float32) + 1000 * rank
        big_out = torch.zeros(size, n_big) if rank == root else None
        comm.gather_into(big_out, mine, root=root)
        if rank == root:
            assert big_out is not None
            for r in range(size):
                want = torch.arange(n_big, dtype=torch.float32) + 1000 * r
                assert torch.equal(big_out[r], want)
        src = torch.stack([torch.full((n_big,), float(r)) for r in range(size)])
        got = torch.zeros(n_big)
        comm.scatter_into(got, src if rank == root else None, root=root)
        assert bool((got == rank).all())

    # Object API: codec headers too long to ride in the envelope, many and empty buffers,
    # different sizes on every rank.
    def obj(r: int) -> object:
        return {f"t{i}": torch.full((i + r,), float(r)) for i in range(40)} | {"e": b"", "r": r}

    for root in range(size):
        got = comm.broadcast(obj(root) if rank == root else None, root=root)
        _same_obj(got, obj(root))
        objs = comm.gather(obj(rank), root=root)
        if rank == root:
            assert objs is not None
            for r in range(size):
                _same_obj(objs[r], obj(r))
        scattered = comm.scatter([obj(r) for r in range(size)] if rank == root else None, root)
        _same_obj(scattered, obj(rank))
    for r, item in enumerate(comm.allgather(obj(rank))):
        _same_obj(item, obj(r))
    right, left = (rank + 1) % size, (rank - 1) % size
    work = comm.isend(obj(rank), right, tag=9)
    _same_obj(comm.recv(left, tag=9), obj(left))
    work.wait()

    # Caller errors that stay local, and the p2p size check.
    engine = comm.engine
    assert isinstance(engine, MPIBackend)
    try:
        comm.send(1, right, tag=-1)
    except Exception as err:
        assert "tag=-1" in str(err), err
    else:
        raise AssertionError("a negative tag must be refused")
    work = comm.isend_buffer(torch.zeros(4), right, tag=11)
    try:
        comm.recv_into(torch.zeros(8), left, tag=11)
    except CollectiveMismatchError as err:
        assert "16 bytes" in str(err), err
    else:
        raise AssertionError("recv_into of a shorter message must raise")
    work.wait()
    from collectives.backends.base import BackendConfig

    for bad in (BackendConfig(size=size + 1), BackendConfig(rank=(rank + 1) % size, size=size)):
        try:
            MPIBackend.create(bad)
        except ConfigurationError as err:
            assert "MPI" in str(err), err
        else:
            raise AssertionError(f"{bad} must be refused")
    comm.barrier()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _same_obj(got: object, want: object) -> None:
    from collectives.testing.payloads import assert_same

    assert_same(got, want, "object")


def _deadline(comm: object) -> None:
    import torch

    from collectives.communicator import Communicator
    from collectives.errors import CollectiveTimeoutError, CommunicatorAbortedError

    assert isinstance(comm, Communicator)
    rank = comm.rank
    # A p2p recv that times out is cancelled: the next message on that tag still arrives intact.
    if rank == 0:
        start = time.monotonic()
        try:
            comm.recv(1, tag=5, timeout=0.5)
        except CollectiveTimeoutError as err:
            assert err.ranks == (1,), err
            assert time.monotonic() - start < 0.5 + SLACK_S
        else:
            raise AssertionError("recv from a silent rank must time out")
        comm.barrier()
        assert comm.recv(1, tag=5) == "late but whole"
    else:
        comm.barrier()
        comm.send("late but whole", 0, tag=5)
    comm.barrier()

    # abort() from another thread fails a pending op promptly.
    abort_fails_pending(comm, lambda c: c.allgather_into(torch.zeros(2, 4), torch.zeros(4)))

    # A rank that never calls: the collective times out on time, naming the root.
    timeout = 1.0
    if rank == 0:
        start = time.monotonic()
        try:
            comm.broadcast_into(torch.zeros(1000), root=1, timeout=timeout)
        except CollectiveTimeoutError as err:
            assert err.ranks == (1,), err
            elapsed = time.monotonic() - start
            assert timeout <= elapsed < timeout + SLACK_S, elapsed
        else:
            raise AssertionError("broadcast_into must time out when the root never calls")
        try:
            comm.barrier()
        except CommunicatorAbortedError:
            pass
        else:
            raise AssertionError("a communicator must refuse ops after a timed-out collective")
    else:
        time.sleep(timeout + 0.5)


def _mismatch(comm: object) -> None:
    from collectives.communicator import Communicator
    from collectives.errors import CollectiveMismatchError, CollectiveTimeoutError

    assert isinstance(comm, Communicator)
    start = time.monotonic()
    try:
        if comm.rank == 0:
            comm.broadcast({"x": 1}, root=0, timeout=2.0)
        else:
            comm.allgather("y", timeout=2.0)
    except CollectiveMismatchError as err:
        assert "broadcast" in str(err) and "allgather" in str(err), err
    except CollectiveTimeoutError:
        pass
    else:
        raise AssertionError(f"rank {comm.rank} finished mismatched calls without an error")
    assert time.monotonic() - start < 2.0 + SLACK_S


def _broadcast_sizes(comm: object) -> None:
    """The large broadcast goes as plain messages (3+ ranks, tree or scatter + allgather): a rank
    whose buffer is bigger or smaller than the root's must get a mismatch error, never a short or
    torn buffer."""
    import torch

    from collectives.communicator import Communicator
    from collectives.errors import CollectiveMismatchError, CollectiveTimeoutError

    assert isinstance(comm, Communicator)
    for root in range(comm.size):  # every root, bit-exact, through the tree
        for numel in (1 << 19, 3 << 18):  # 2 MiB; 3 MiB, cut into pieces at 3 ranks too
            buf = torch.arange(numel, dtype=torch.float32) * (comm.rank + 1)
            comm.broadcast_into(buf, root=root)
            want = torch.arange(numel, dtype=torch.float32) * (root + 1)
            assert torch.equal(buf, want), (root, numel)
    numel = {0: 1 << 19, 1: 3 << 18, 2: 1 << 18}.get(comm.rank, 1 << 19)
    start = time.monotonic()
    try:
        comm.broadcast_into(torch.zeros(numel), root=0, timeout=2.0)
    except CollectiveMismatchError as err:
        assert comm.rank in (1, 2) or "broadcast" in str(err), err
    except CollectiveTimeoutError:
        assert comm.rank not in (1, 2), "a wrong-sized receive must be named as a mismatch"
    else:
        assert comm.rank not in (1, 2), f"rank {comm.rank} took a wrong-sized broadcast"
    assert time.monotonic() - start < 2.0 + SLACK_S


def _allgather_exact(comm: object) -> None:
    import torch

    from collectives.communicator import Communicator

    assert isinstance(comm, Communicator)
    for numel in (3, 1 << 19):  # short messages and 1 MiB blocks take different algorithms
        mine = (torch.arange(numel, dtype=torch.float32) * (comm.rank + 1)).to(torch.bfloat16)
        out = torch.empty(comm.size * numel, dtype=torch.bfloat16)
        comm.allgather_into(out, mine)
        for r, block in enumerate(out.view(comm.size, numel)):
            want = (torch.arange(numel, dtype=torch.float32) * (r + 1)).to(torch.bfloat16)
            assert torch.equal(block.view(torch.int16), want.view(torch.int16)), (r, numel)
        got = comm.allgather({"rank": comm.rank, "t": mine[:2]})
        assert [g["rank"] for g in got] == list(range(comm.size)), got


def _iallgather_algorithm() -> str | None:
    from mpi4py import MPI

    from collectives.backends import mpi_tuning

    writer = mpi_tuning._CvarWriter.open(MPI, mpi_tuning.IALLGATHER)
    assert writer is not None, "MPICH's MPI_T interface did not open"
    try:
        return writer.current()
    finally:
        writer.close()


def _tuning(comm: object) -> None:
    from collectives.backends import mpi_tuning
    from collectives.communicator import Communicator

    assert isinstance(comm, Communicator)
    tuning = comm.engine.tuning  # type: ignore[attr-defined]
    if comm.size == 4:
        assert tuning == {mpi_tuning.IALLGATHER: mpi_tuning.RECURSIVE_DOUBLING}, tuning
        assert _iallgather_algorithm() == mpi_tuning.RECURSIVE_DOUBLING
    else:
        assert tuning == {}, tuning
        assert _iallgather_algorithm() == "auto"
    _allgather_exact(comm)


def _tuning_off(comm: object) -> None:
    from collectives.communicator import Communicator

    assert isinstance(comm, Communicator)
    assert comm.engine.tuning == {}, comm.engine.tuning  # type: ignore[attr-defined]
    assert _iallgather_algorithm() == "auto"
    _allgather_exact(comm)


def _broadcast_plan(comm: object) -> None:
    from collectives.backends.mpi_placement import usable_cpus
    from collectives.communicator import Communicator

    assert isinstance(comm, Communicator)
    plan = comm.engine.broadcast_plan  # type: ignore[attr-defined]
    forced = os.environ.get("COMFY_CLUSTER_MPI_BROADCAST")
    if forced:
        assert plan == forced, (plan, forced)
    else:  # every rank of these tests shares one host and one affinity mask
        crowded = comm.size > len(usable_cpus())
        assert plan == ("tree" if crowded else "scatter_allgather"), (plan, usable_cpus())


SCENARIOS: dict[str, Callable[[object], None]] = {
    "tuning": _tuning,
    "tuning_off": _tuning_off,
    "dtypes": _dtypes,
    "deadline": _deadline,
    "mismatch": _mismatch,
    "fast_paths": fast_paths,
    "broadcast_sizes": _broadcast_sizes,
    "broadcast_plan": _broadcast_plan,
}


def _refused() -> None:
    from mpi4py import MPI

    from collectives.errors import ConfigurationError
    from collectives.world import init

    try:
        init("mpi", timeout=30)
    except ConfigurationError as err:
        assert "COMFY_CLUSTER_MPI_BROADCAST differs between ranks" in str(err), err
        print(f"rank {MPI.COMM_WORLD.Get_rank()} refused ok", flush=True)
        return
    raise AssertionError("ranks with different broadcast plans must refuse to start")


def _main(scenarios: str) -> None:
    from mpi4py import MPI

    from collectives.world import init

    if scenarios == "refused":
        _refused()
        return

    for scenario in scenarios.split(","):
        comm = init("mpi", timeout=30)  # a fresh communicator: the last may be out of step
        try:
            SCENARIOS[scenario](comm)
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        print(f"rank {comm.rank} {scenario} ok", flush=True)
        comm.close()
        # Meet on MPI_COMM_WORLD (untouched by the backend's private communicators) so that
        # timings of the next scenario do not include another rank's lag.
        MPI.COMM_WORLD.Barrier()
    # Some scenarios leave requests pending on purpose: skip the orderly shutdown.
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1])
