"""Same-host messages of the udp backend (collectives.backends.udp_cma): bodies copied out of the
sender's memory, the probe that allows it, and what a peer that lies about it gets.

Thread worlds (one process) never pass the probe (a process does not probe itself), so the tests
that need far messages there name the peers readable by hand: ``process_vm_readv`` on this
process's own pid is a real cross-memory copy.  Real processes are started by the launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from collectives.backends import cma, udp_cma
from collectives.backends.udp import channel_id
from collectives.codec import encode
from collectives.communicator import Communicator
from collectives.errors import ConnectionLostError, RemoteProtocolError
from tests.backends.test_udp_driver import keyed
from tests.backends.udp_worlds import launched_world, run_world

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not cma.enabled(), reason="no process_vm_readv on this platform")


def _engine(comm: Communicator) -> Any:
    return comm.engine._engine  # type: ignore[attr-defined]


def _readable(comm: Communicator) -> None:
    """Name every peer readable, at this process's pid (see the module docstring)."""
    engine = _engine(comm)
    with engine.lock:
        engine.cma_sources = {r: os.getpid() for r in range(comm.size) if r != comm.rank}
        engine.cma_readers = frozenset(engine.cma_sources)
    comm.barrier()


def test_thread_worlds_do_not_probe_themselves_readable() -> None:
    def fn(comm: Communicator) -> Any:
        engine = _engine(comm)
        return engine.cma_sources, engine.cma_readers

    assert run_world(2, keyed(2), fn) == [({}, frozenset())] * 2


class _ProbeBackend:
    """Rank 0 of 2 for :func:`cma.probe_world`, its peer a probe in a real child process;
    records what the engine held when the verdicts left."""

    rank, size = 0, 2

    def __init__(self, engine: Any, peer_descriptor: bytes) -> None:
        self.engine = engine
        self.peer_descriptor = peer_descriptor
        self.sources_at_verdicts: dict[int, int] | None = None

    def allgather_into(self, out: torch.Tensor, tensor: torch.Tensor, ctx: Any) -> None:
        out[0].copy_(tensor)
        if out.shape[1] == cma.DESCRIPTOR_BYTES:  # the descriptors
            out[1].copy_(torch.frombuffer(bytearray(self.peer_descriptor), dtype=torch.uint8))
            return
        self.sources_at_verdicts = dict(self.engine.cma_sources)  # the verdicts leave now
        out[1].copy_(torch.tensor([1, 0], dtype=torch.uint8))  # the peer can read rank 0


class _Engine:
    def __init__(self) -> None:
        self.cma_sources: dict[int, int] = {}
        self.cma_readers: frozenset[int] = frozenset()


def test_the_probe_sets_the_sources_before_the_verdicts_leave() -> None:
    """A peer that learns from this rank's verdict that it is read may send a same-host message
    before this rank's probe returns; the driver checks the sources when it arrives."""
    code = (
        "import sys; from collectives.backends import cma; p = cma.Probe(); "
        "print(p.descriptor().hex(), flush=True); sys.stdin.read()"
    )
    peer = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert peer.stdout is not None
        descriptor = bytes.fromhex(peer.stdout.readline().strip())
        engine = _Engine()
        backend = _ProbeBackend(engine, descriptor)
        cma.probe_world(backend, 5.0, engine)
    finally:
        peer.communicate("", timeout=30)
    assert backend.sources_at_verdicts == {1: peer.pid}
    assert engine.cma_sources == {1: peer.pid} and engine.cma_readers == frozenset({1})


def test_far_messages_carry_every_collective_bit_exact() -> None:
    def fn(comm: Communicator) -> Any:
        _readable(comm)
        r = comm.rank
        big = torch.randn(1 << 18, generator=torch.Generator().manual_seed(r))  # 1 MiB
        out = torch.empty_like(big)
        comm.broadcast_into(out if r else big.clone(), 0)
        got = comm.allgather([big, torch.arange(3), b"z" * (cma.MIN_BYTES + 1)])
        # A fan-out: the root posts every far block before it waits for the copies (send_each).
        whole = torch.arange(comm.size).repeat_interleave(1 << 17).float() if r == 0 else None
        part = torch.empty(1 << 17)
        comm.scatter_into(part, whole, 0)
        assert bool((part == r).all())
        if r == 0:
            comm.send_buffer(big, 1)
        elif r == 1:
            comm.recv_into(out, 0)
        stats = comm.stats()
        return got, out, stats["far_sent"], stats["far_read"]

    results = run_world(3, keyed(3), fn)
    want = [torch.randn(1 << 18, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    for rank, (got, out, sent, read) in enumerate(results):
        for r, (t, small, raw) in enumerate(got):
            assert torch.equal(t, want[r]) and small.tolist() == [0, 1, 2]
            assert raw == b"z" * (cma.MIN_BYTES + 1)
        if rank == 1:
            assert torch.equal(out, want[0])  # the point-to-point receive
        assert sent > 0 and read > 0, (rank, sent, read)


def _post_far(comm: Communicator, addresses: list[int] | None = None) -> None:
    """Rank 0 posts a 1 MiB far message to rank 1 on user tag 0, as a sender that skips the
    probe's verdict would (``addresses``: claim these instead of the buffer's)."""
    from collectives.backends.envelope import user_envelope
    from collectives.deadline import Deadline

    backend: Any = comm.engine
    engine = _engine(comm)
    msg = encode(torch.ones(1 << 18))
    meta = user_envelope(backend.comm_id, backend.epoch).pack() + bytes(msg.header)
    body = [b.cast("B") for b in msg.buffers]
    dl = Deadline.start(10.0, "send", 0)
    if addresses is None:
        engine.send_far(1, channel_id("p0"), meta, body, dl)
        return
    # A forged one: the far meta by hand, then wait for the receiver's answer as send_far does.
    with engine.lock:
        engine._xfers += 1
        xfer = engine._xfers
        engine.far_answers[xfer] = None
        engine.ep.send(1, channel_id("p0"), udp_cma.far_meta(xfer, addresses, meta), [],
                       engine.clock())  # fmt: skip
        engine._release_held()
        engine._drive(lambda: engine.far_answers[xfer] is not None, 1, dl, None)
        code = engine.far_answers.pop(xfer)
    raise ConnectionLostError(udp_cma.failure(1, code), [1])


def test_a_far_message_from_a_peer_not_probed_readable_is_refused() -> None:
    def fn(comm: Communicator) -> Any:
        if comm.rank == 0:
            _engine(comm).cma_readers = frozenset({1})  # this side lies; rank 1 never probed it
            comm.barrier()
            with pytest.raises(ConnectionLostError, match="refused"):
                _post_far(comm)
        else:
            comm.barrier()
            with pytest.raises(RemoteProtocolError, match="not found readable"):
                comm.recv(0)
            assert comm.stats()["far_read"] == 0
        comm.barrier()  # the world still works: a refused message loses nothing else
        return comm.allgather(comm.rank)

    assert run_world(2, keyed(2), fn) == [[0, 1]] * 2


def test_an_unmapped_address_fails_both_sides_without_touching_memory() -> None:
    def fn(comm: Communicator) -> Any:
        _readable(comm)
        if comm.rank == 0:
            with pytest.raises(ConnectionLostError, match="Bad address"):
                _post_far(comm, addresses=[8])  # the first page is never mapped
        else:
            with pytest.raises(ConnectionLostError, match="Bad address"):
                comm.recv(0)
        return comm.rank

    assert run_world(2, keyed(2), fn) == [0, 1]


def test_a_far_message_over_the_receivers_limit_is_refused_before_any_copy() -> None:
    import dataclasses

    from collectives.errors import CodecError

    def fn(comm: Communicator) -> Any:
        _readable(comm)
        if comm.rank == 1:
            backend: Any = comm.engine
            backend.codec = dataclasses.replace(backend.codec, max_message_bytes=1 << 16)
        comm.barrier()  # the limit is in place before the message comes
        if comm.rank == 0:
            with pytest.raises(ConnectionLostError, match="refused"):
                _post_far(comm)  # 1 MiB
        else:
            with pytest.raises(CodecError, match="max_message_bytes"):
                comm.recv(0)
            assert comm.stats()["far_read"] == 0
        return comm.rank

    assert run_world(2, keyed(2), fn) == [0, 1]


def test_a_forged_answer_for_a_transfer_nobody_waits_for_is_dropped() -> None:
    def fn(comm: Communicator) -> Any:
        engine = _engine(comm)
        if comm.rank == 0:
            with engine.lock:
                engine.ep.send(1, udp_cma.ACK_CHANNEL, udp_cma.ack_meta(77, 0), [],
                               engine.clock())  # fmt: skip
                engine._release_held()
        comm.barrier()
        with engine.lock:
            answers = dict(engine.far_answers)
        return answers, comm.allgather(comm.rank)

    assert run_world(2, keyed(2), fn) == [({}, [0, 1])] * 2


def test_far_metas_are_parsed_within_bounds() -> None:
    meta = udp_cma.far_meta(5, [1, 2], b"rest")
    assert udp_cma.is_far(meta)
    assert udp_cma.parse_far(meta, 3) == udp_cma.Far(5, [1, 2], b"rest")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        udp_cma.parse_far(meta[:10], 3)
    with pytest.raises(RemoteProtocolError, match="malformed"):
        udp_cma.parse_far(meta[:20], 3)  # announces two addresses, carries one
    huge = udp_cma.far_meta(1, [0] * (udp_cma.MAX_BUFFERS + 1), b"")
    with pytest.raises(RemoteProtocolError, match="malformed"):
        udp_cma.parse_far(huge, 3)
    assert udp_cma.parse_ack(udp_cma.ack_meta(9, 14)) == (9, 14)
    assert udp_cma.parse_ack(b"CCFA" + bytes(11)) is None  # wrong length
    assert udp_cma.parse_ack(b"XXXX" + bytes(12)) is None


_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    import collectives
    comm = collectives.init(timeout=60)
    engine = comm.engine._engine
    big = torch.full((1 << 20,), float(comm.rank))
    for root in range(comm.size):
        x = big.clone() if comm.rank == root else torch.empty(1 << 20)
        comm.broadcast_into(x, root)
        assert bool((x == root).all())
    got = comm.allgather(big)
    assert all(bool((t == r).all()) for r, t in enumerate(got))
    stats = comm.stats()
    from collectives.doctor import run_checks
    paths = [c.line() for c in run_checks(comm=comm, timeout=2) if c.name.startswith("path to")]
    report = dict(readers=sorted(engine.cma_readers), sources=engine.cma_sources,
                  sent=stats["far_sent"], read=stats["far_read"], pid=os.getpid(),
                  same_host=stats["same_host"], paths=paths)
    with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
        json.dump(report, f)
    comm.close()
    """
)


def _processes(tmp_path: Path, env: dict[str, str], n: int = 3) -> dict[int, dict[str, Any]]:
    return launched_world(tmp_path, _SCRIPT, env, n)


def test_processes_of_one_host_copy_large_bodies_out_of_each_other(tmp_path: Path) -> None:
    reports = _processes(tmp_path, {})
    pids = {r: rep["pid"] for r, rep in reports.items()}
    for r, rep in reports.items():
        others = sorted(set(pids) - {r})
        assert rep["readers"] == others
        assert {int(k): v for k, v in rep["sources"].items()} == {p: pids[p] for p in others}
        assert rep["sent"] > 0 and rep["read"] > 0
        assert rep["same_host"] == others  # comm.stats(), and the doctor's path lines
        assert len(rep["paths"]) == len(others)
        assert all("large bodies copied from its memory" in line for line in rep["paths"])


def test_turned_off_every_body_goes_through_the_socket(tmp_path: Path) -> None:
    reports = _processes(tmp_path, {cma.ENV: "0"}, n=2)
    assert all(rep["readers"] == [] and rep["sources"] == {} for rep in reports.values())
    assert all(rep["sent"] == 0 and rep["read"] == 0 for rep in reports.values())
    assert all(rep["same_host"] == [] for rep in reports.values())
    assert not any("copied from its memory" in x for rep in reports.values() for x in rep["paths"])


@pytest.mark.parametrize(
    ("scope", "root", "cap", "allowed", "names"),
    [
        (None, False, False, True, "same user"),  # no Yama
        (0, False, False, True, "same user"),
        (1, False, False, False, "kernel.yama.ptrace_scope=0"),
        (1, True, False, True, "root or CAP_SYS_PTRACE"),
        (1, False, True, True, "root or CAP_SYS_PTRACE"),
        (2, False, False, False, "CAP_SYS_PTRACE"),
        (3, True, True, False, "scope is 3"),
    ],
)
def test_the_doctor_reads_whether_sibling_ranks_may_copy(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    scope: int | None,
    root: bool,
    cap: bool,
    allowed: bool,
    names: str,
) -> None:
    yama = tmp_path / "ptrace_scope"
    if scope is not None:
        yama.write_text(f"{scope}\n")
    monkeypatch.setattr(cma, "_YAMA", str(yama))
    monkeypatch.setattr(cma.os, "geteuid", lambda: 0 if root else 1000)
    monkeypatch.setattr(cma, "_has_cap_sys_ptrace", lambda: cap)
    monkeypatch.delenv(cma.ENV, raising=False)
    assert cma.host_policy() == (allowed, cma.host_policy()[1])
    assert names in cma.host_policy()[1]
    monkeypatch.setenv(cma.ENV, "0")
    off, why = cma.host_policy()
    assert not off and f"{cma.ENV}=0" in why
