"""A peer that sends pickles, forged headers or another root, against the gloo and mpi backends.

This file is also the script every rank runs (as real processes: gloo ranks spawned with
RANK/WORLD_SIZE/MASTER_*, mpi ranks under ``mpiexec -n 3``)::

    python tests/security/test_backend_pickle.py gloo pickle,roots,forged

Rank 0 is the attacker.  It opts in to pickling and sends a pickle whose ``__reduce__`` would
create a marker file, through every receive path of the backend: ``recv``, ``recv_into``, the
object broadcast/scatter/gather/allgather, ``gatherv_into`` and (gloo) a reduction that gloo
cannot do natively and runs over messages.  The other ranks keep the default codec options: each
path must refuse the message (``CodecError`` or ``CollectiveMismatchError``) and the marker must
never appear.  Then the ranks disagree about a root (rank 0 names root 0, the others root 1):
every rank must fail, none may return data.  Last (gloo), rank 0 posts raw envelopes announcing
a 1 TiB buffer and a 100,000-buffer header: rank 1 must refuse each promptly, allocating nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE = 3
TIMEOUT_S = 4.0
SLACK_S = 4.0


# -- pytest side -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(marker: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MARKER=str(marker))
    env.pop("COMFY_CLUSTER_BACKEND", None)
    env.pop("COMFY_CLUSTER_ALLOW_PICKLE", None)
    return env


def _run_gloo(scenarios: str, marker: Path) -> str:
    port = _free_port()
    procs = []
    for rank in range(SIZE):
        env = dict(
            _env(marker),
            RANK=str(rank),
            WORLD_SIZE=str(SIZE),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "gloo", scenarios],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += "\n[killed: the rank hung]"
        logs.append(out)
    return "\n".join(f"--- rank {r} ---\n{log}" for r, log in enumerate(logs))


def _run_mpi(scenarios: str, marker: Path) -> str:
    from collectives.testing.spmd import mpiexec

    proc = subprocess.run(
        [mpiexec(), "-n", str(SIZE), sys.executable, __file__, "mpi", scenarios],
        check=False,
        cwd=ROOT,
        env=_env(marker),
        capture_output=True,
        text=True,
        timeout=150,
    )
    return proc.stdout + proc.stderr


def _check(log: str, scenario: str) -> None:
    for rank in range(SIZE):
        assert f"rank {rank} {scenario} ok" in log, log[-8000:]


@pytest.mark.gloo
def test_gloo_refuses_pickles_foreign_roots_and_forged_sizes(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    marker = tmp_path / "pwned"
    log = _run_gloo("pickle,roots,forged", marker)
    assert not marker.exists(), "a peer's pickle was executed"
    for scenario in ("pickle", "roots", "forged"):
        _check(log, scenario)


@pytest.mark.mpi
def test_mpi_refuses_pickles_and_foreign_roots(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    marker = tmp_path / "pwned"
    log = _run_mpi("pickle,roots", marker)
    assert not marker.exists(), "a peer's pickle was executed"
    for scenario in ("pickle", "roots"):
        _check(log, scenario)


# -- rank side -------------------------------------------------------------------------------------
class Evil:
    """Unpickling this creates the marker file: the proof that a peer's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


class _Refusals:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.seen: list[str] = []

    def expect(self, path: str, call: Callable[[], object]) -> None:
        from collectives.errors import CodecError, CollectiveMismatchError

        try:
            got = call()
        except (CodecError, CollectiveMismatchError) as err:
            if isinstance(err, CollectiveMismatchError):
                assert 0 in err.ranks, (path, err.ranks, err)  # the attacker is named
            self.seen.append(path)
            return
        raise AssertionError(f"rank {self.rank}: {path} accepted a pickle ({got!r})")

    def expect_no_data(self, path: str, call: Callable[[], object]) -> None:
        """A rank the attacker does not talk to directly: it must fail (refusal or timeout)."""
        from collectives.errors import CodecError, CollectiveMismatchError, CollectiveTimeoutError

        try:
            got = call()
        except (CodecError, CollectiveMismatchError, CollectiveTimeoutError):
            return
        raise AssertionError(f"rank {self.rank}: {path} returned {got!r} after a peer's pickle")


def _pickle(comm: Any, backend: str) -> None:
    """Rank 0 sends pickles down every receive path; ranks 1 and 2 must refuse them all.

    A refused message leaves the victim's communicator unusable (by design), so every path runs
    on a communicator of its own; creating it is also what keeps the ranks in step.
    """
    import dataclasses

    import torch

    import collectives
    import collectives.algorithms.reduction as reduction
    import collectives.backends.torch_dist as torch_dist
    import collectives.codec as codec
    from collectives.codec import CodecOptions

    marker = os.environ["MARKER"]
    rank, victims, t = comm.rank, (1, 2), TIMEOUT_S
    pickles = CodecOptions(allow_pickle=True)
    evil = Evil(marker)
    refused = _Refusals(rank)

    def fresh() -> Any:
        c = collectives.init(backend, timeout=30)
        if rank == 0:
            c.options = dataclasses.replace(c.options, codec=pickles)
        return c

    real_encode = codec.encode

    def send_pickle(*_args: object) -> object:
        return real_encode(evil, pickles)

    # user point to point: recv, then recv_into (a buffer receive)
    for tag, path in ((1, "recv"), (2, "recv_into")):
        c = fresh()
        if rank == 0:
            works = [c.isend(evil, v, tag=tag, timeout=t) for v in victims]
            for work in works:
                _settle(work.wait)
        elif path == "recv":
            refused.expect(path, lambda c=c: c.recv(0, tag=1, timeout=t))
        else:
            refused.expect(path, lambda c=c: c.recv_into(torch.empty(10), 0, tag=2, timeout=t))

    # object collectives, rank 0 the root or a contributor
    objects: dict[str, Callable[[Any], object]] = {
        "broadcast": lambda c: c.broadcast(evil if c.rank == 0 else None, root=0, timeout=t),
        "scatter": lambda c: c.scatter([evil] * c.size if c.rank == 0 else None, root=0, timeout=t),
        "gather": lambda c: c.gather(evil if c.rank == 0 else "fine", root=1, timeout=t),
        "allgather": lambda c: c.allgather(evil if c.rank == 0 else "fine", timeout=t),
    }
    for path, call in objects.items():
        c = fresh()
        if rank == 0:
            _settle(lambda c=c, call=call: call(c))
        elif path == "gather" and rank == 2:
            call(c)  # a sender: it receives nothing
        else:
            refused.expect(path, lambda c=c, call=call: call(c))

    # gatherv_into: rank 0 runs the real protocol with a pickle in place of its block
    c = fresh()
    mine = torch.full((rank + 1,), float(rank))
    blocks = [torch.empty(r + 1) for r in range(c.size)] if rank == 1 else None
    if rank == 0:
        with _swapped([(torch_dist, "encode"), (codec, "encode")], send_pickle):
            _settle(lambda: c.gatherv_into(blocks, mine, root=1, timeout=t))
    elif rank == 1:
        refused.expect("gatherv_into", lambda: c.gatherv_into(blocks, mine, root=1, timeout=t))
    else:
        c.gatherv_into(blocks, mine, root=1, timeout=t)

    # a reduction gloo cannot do (float8): the shared algorithm (recursive doubling; with three
    # ranks rank 0 exchanges with rank 1 only, so rank 1 refuses the pickle and rank 2, waiting
    # for rank 1, fails by timeout or refusal: never with data)
    if backend == "gloo":
        c = fresh()
        f8 = torch.zeros(4, dtype=torch.float8_e4m3fn)
        if rank == 0:
            with _swapped([(reduction, "encode")], send_pickle):
                _settle(lambda: c.allreduce(f8, timeout=t))
        elif rank == 1:
            refused.expect("allreduce (float8)", lambda: c.allreduce(f8, timeout=t))
        else:
            refused.expect_no_data("allreduce (float8)", lambda: c.allreduce(f8, timeout=t))

    assert not Path(marker).exists(), "a peer's pickle was executed"
    if rank != 0:
        want = ["recv", "recv_into", "broadcast", "scatter", "allgather"]
        if rank == 1:
            want += ["gather", "gatherv_into"]
        if backend == "gloo" and rank == 1:
            want.append("allreduce (float8)")
        assert sorted(refused.seen) == sorted(want), refused.seen


def _settle(call: Callable[[], object]) -> None:
    """The attacker's side of a path: whatever the victim did, it may fail here."""
    from collectives.errors import CollectivesError

    with contextlib.suppress(CollectivesError):
        call()


class _swapped:
    """Replace module attributes (the sender's encoder) for the duration of a ``with``."""

    def __init__(self, where: list[tuple[Any, str]], value: object) -> None:
        self.where = where
        self.value = value
        self.saved: list[object] = []

    def __enter__(self) -> None:
        for module, name in self.where:
            self.saved.append(getattr(module, name))
            setattr(module, name, self.value)

    def __exit__(self, *exc: object) -> None:
        for (module, name), old in zip(self.where, self.saved, strict=True):
            setattr(module, name, old)


def _roots(comm: Any, backend: str) -> None:
    """Rank 0 names root 0, ranks 1 and 2 root 1: every rank fails, none returns data."""
    import collectives
    from collectives.errors import CollectiveMismatchError, CollectiveTimeoutError

    calls: dict[str, Callable[[Any, int], object]] = {
        "broadcast": lambda c, root: c.broadcast("data" if c.rank == root else None, root=root),
        "scatter": lambda c, root: c.scatter(
            ["a", "b", "c"] if c.rank == root else None, root=root
        ),
        "gather": lambda c, root: c.gather(c.rank, root=root),
    }
    for name, call in calls.items():
        fresh = collectives.init(backend, timeout=TIMEOUT_S)  # the last one is out of step
        root = 0 if comm.rank == 0 else 1
        start = time.monotonic()
        try:
            got = call(fresh, root)
        except CollectiveMismatchError as err:
            assert "root 0" in str(err) and "root 1" in str(err), err
            print(f"rank {comm.rank} {name}: mismatch", flush=True)
        except CollectiveTimeoutError:
            print(f"rank {comm.rank} {name}: timeout", flush=True)
        else:
            raise AssertionError(f"rank {comm.rank}: {name} with disagreeing roots gave {got!r}")
        assert time.monotonic() - start < TIMEOUT_S + SLACK_S, name


def _forged(comm: Any, backend: str) -> None:
    """Rank 0 posts raw envelopes (the engine's own send) announcing absurd sizes to rank 1."""
    import numpy as np
    import torch

    from collectives.backends.base import OpContext
    from collectives.backends.envelope import user_envelope
    from collectives.backends.torch_engine import user_tag
    from collectives.backends.torch_messages import ENVELOPE_BYTES, INLINE_AT
    from collectives.codec import encode
    from collectives.codec.frames import BufferEntry, Header, Kind
    from collectives.deadline import Deadline
    from collectives.errors import CodecError, RemoteProtocolError

    assert backend == "gloo"
    engine = comm.engine._engine
    meta = Header.parse(encode(torch.zeros(1)).header).body
    huge = Header(Kind.ARRAY, (BufferEntry(0, False, 1 << 40, 1 << 40),), meta).to_bytes()
    many = Header(Kind.PICKLE, tuple(BufferEntry(0, False, 1, 1) for _ in range(100_000)), b"")
    forged = [("1 TiB buffer", huge, len(huge)), ("100,000 buffers", b"", len(many.to_bytes()))]
    for tag, (what, inline, header_len) in enumerate(forged, start=20):
        if comm.rank == 0:
            env = np.zeros(ENVELOPE_BYTES, dtype=np.uint8)
            user_envelope(engine.comm, engine.epoch).pack_into(env.data)
            np.frombuffer(env.data, dtype=np.uint32)[14] = header_len  # codec header length
            env[INLINE_AT : INLINE_AT + len(inline)] = np.frombuffer(inline, dtype=np.uint8)
            ctx = OpContext("send", 0, Deadline.start(TIMEOUT_S, "send", 0))
            work = engine.post_send(torch.from_numpy(env), 1, user_tag(tag, "send"), ctx)
            engine.wait_all([(work, 1)], ctx)
        elif comm.rank == 1:
            # Refused when the envelope arrives: a receiver that waited for 1 TiB instead would
            # end in CollectiveTimeoutError, which is not caught here.
            try:
                comm.recv(0, tag=tag, timeout=TIMEOUT_S)
            except (CodecError, RemoteProtocolError) as err:
                text = str(err)
                assert "max_message_bytes" in text or "max_buffers" in text, (what, text)
            else:
                raise AssertionError(f"a forged envelope ({what}) was accepted")
        comm.barrier(timeout=TIMEOUT_S)


SCENARIOS = {"pickle": _pickle, "roots": _roots, "forged": _forged}


def main(backend: str, scenarios: str) -> int:
    import collectives

    comm = collectives.init(backend, timeout=30)
    for name in scenarios.split(","):
        try:
            SCENARIOS[name](comm, backend)
        except BaseException:
            print(f"rank {comm.rank} {name} FAILED\n{traceback.format_exc()}", flush=True)
            os._exit(1)
        print(f"rank {comm.rank} {name} ok", flush=True)
    os._exit(0)  # communicators were left out of step on purpose: no collective shutdown


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
