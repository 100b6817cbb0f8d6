"""Same-host rings of the udp backend (collectives.backends.udp_shm): order across the ring
and the socket, posts that never wait for the reader, doorbells, what a peer that breaks the
ring's format gets, and the rings real processes of one host set up when their world forms.

Thread worlds (one process) never pass the same-host probe, so the thread tests attach rings by
hand: both mappings of each ring in this process, as two processes would map it."""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from collectives.backends import cma, shm_ring, udp_shm
from collectives.communicator import Communicator
from collectives.errors import CollectivesError, ConnectionLostError
from tests.backends.test_udp_driver import keyed
from tests.backends.udp_worlds import launched_world, run_world

pytestmark = pytest.mark.skipif(
    not (shm_ring.available() and cma.enabled()), reason="rings need Linux on x86-64"
)


def _engine(comm: Communicator) -> Any:
    return comm.engine._engine  # type: ignore[attr-defined]


class _Rings:
    """One ring per ordered pair of ``n`` thread ranks, both ends mapped in this process."""

    def __init__(self, n: int) -> None:
        self.writers: dict[tuple[int, int], shm_ring.Ring] = {}
        self.readers: dict[tuple[int, int], shm_ring.Ring] = {}
        for a in range(n):
            for b in range(n):
                if a != b:
                    fd, self.writers[a, b] = shm_ring.create()
                    self.readers[a, b] = shm_ring.attach(os.getpid(), fd)
                    os.close(fd)

    def start(self, comm: Communicator, *, far: bool = False) -> None:
        """Switch ``comm`` to the rings (and, with ``far``, to far messages at this process's
        own pid), then a barrier: every rank reads its rings before anything is sent on them."""
        engine, r = _engine(comm), comm.rank
        peers = [p for p in range(comm.size) if p != r]
        if far:
            with engine.lock:
                engine.cma_sources = {p: os.getpid() for p in peers}
                engine.cma_readers = frozenset(peers)
        engine.start_shm(
            {p: self.writers[r, p] for p in peers}, {p: self.readers[p, r] for p in peers}
        )
        comm.barrier()


def test_small_messages_go_through_the_rings_in_order_with_far_ones() -> None:
    rings = _Rings(3)
    big = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB: a far message (socket)

    def fn(comm: Communicator) -> Any:
        rings.start(comm, far=True)
        before = comm.stats()
        got: list[Any] = []
        if comm.rank == 0:
            for i in range(5):  # one channel: ring, socket, ring... in the order posted
                comm.send(i, 1, tag=3)
                comm.send(big + i, 1, tag=3)
        elif comm.rank == 1:
            for i in range(5):
                got.append(comm.recv(0, tag=3))
                got.append(bool(torch.equal(comm.recv(0, tag=3), big + i)))
        got.append(comm.broadcast({"root": 2} if comm.rank == 2 else None, root=2))
        got.append(comm.allgather(comm.rank * 7))
        after = comm.stats()
        return got, after["shm_sent"] - before["shm_sent"], after["far_sent"], after["shm_peers"]

    results = run_world(3, keyed(3), fn)
    got1, _, _, _ = results[1]
    assert got1[:10] == [0, True, 1, True, 2, True, 3, True, 4, True]
    for rank, (got, shm_sent, _, peers) in enumerate(results):
        assert got[-2:] == [{"root": 2}, [0, 7, 14]]
        assert shm_sent > 0
        assert peers == [p for p in range(3) if p != rank]
    assert results[0][2] == 5  # the large bodies went as far messages, not through the ring


def test_posts_to_a_peer_that_does_not_take_never_wait_for_the_ring() -> None:
    rings = _Rings(2)
    posted = threading.Event()
    count, numel = 30, 25_000  # 100 KB each, 3 MB in all: three rings' worth

    def fn(comm: Communicator) -> Any:
        rings.start(comm)
        if comm.rank == 0:
            for i in range(count):
                comm.send(torch.full((numel,), float(i)), 1, tag=1)
            posted.set()
            return comm.stats()["shm_sent"]
        # Nothing taken until every post returned (a post that waited for it would hang here).
        assert posted.wait(30), "the sender's posts waited for this rank to take"
        return all(
            bool(torch.equal(comm.recv(0, tag=1), torch.full((numel,), float(i))))
            for i in range(count)
        )

    sent, ok = run_world(2, keyed(2), fn, timeout=60)
    assert ok
    assert sent >= count  # through the ring, which holds a third of them (its IO thread read)


def test_a_receiver_asleep_in_select_is_rung() -> None:
    rings = _Rings(2)

    def fn(comm: Communicator) -> Any:
        rings.start(comm)
        comm.barrier()
        if comm.rank == 0:
            time.sleep(0.3)  # the receiver has long stopped polling and sleeps in select
            before = comm.stats()["doorbells"]
            comm.send(b"late", 1)
            return comm.stats()["doorbells"] - before
        return comm.recv(0)

    rung, got = run_world(2, keyed(2), fn)
    assert got == b"late"
    assert rung == 1


def test_an_empty_datagram_from_anyone_only_wakes_a_ring_rank() -> None:
    rings = _Rings(2)

    def fn(comm: Communicator) -> Any:
        rings.start(comm)
        if comm.rank == 1:
            engine = _engine(comm)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                stranger.settimeout(0.3)
                before = comm.stats()
                for _ in range(5):
                    stranger.sendto(b"", engine.sock.address)
                with pytest.raises(TimeoutError):
                    stranger.recvfrom(100)  # no answer
            comm.barrier()
            after = comm.stats()
            # A doorbell: no datagram reached the core, none is counted as refused.
            return after["dropped_malformed"] - before["dropped_malformed"], comm.peers()
        comm.barrier()
        return None

    assert run_world(2, keyed(2), fn)[1] == (0, {0: "ok"})


def _write_raw(comm: Communicator, peer: int, data: bytes) -> None:
    engine = _engine(comm)
    with engine.lock:
        ring = engine.shm_out[peer]
        assert ring.write(memoryview(data)) == len(data)
        engine._wrote(peer, ring)


def test_a_ring_that_announces_an_oversized_meta_loses_its_peer() -> None:
    rings = _Rings(2)
    head = udp_shm._HEAD.pack(0, 1 << 30, 0)  # a 1 GiB meta: nothing is allocated for it
    checked = threading.Event()

    def fn(comm: Communicator) -> Any:
        rings.start(comm)
        if comm.rank == 0:
            _write_raw(comm, 1, head)
            checked.wait(20)  # not closed meanwhile: the peer's loss names the ring
            return None
        try:
            with pytest.raises(ConnectionLostError, match="ring") as info:
                comm.recv(0, timeout=10)
        finally:
            checked.set()
        return info.value.ranks

    assert run_world(2, keyed(2), fn)[1] == (0,)


def test_a_malformed_message_on_a_ring_is_a_typed_error_and_the_next_one_arrives() -> None:
    rings = _Rings(2)
    junk = b"\xff" * 70  # a meta that is no envelope and no codec header

    def fn(comm: Communicator) -> Any:
        rings.start(comm)
        if comm.rank == 0:
            _write_raw(comm, 1, udp_shm._HEAD.pack(2 + 0, len(junk), 3) + junk + b"abc")
            comm.send(b"after", 1)
            return None
        with pytest.raises(CollectivesError) as info:
            comm.recv(0, timeout=10)
        assert not isinstance(info.value, ConnectionLostError)
        return comm.recv(0, timeout=10)

    assert run_world(2, keyed(2), fn)[1] == b"after"


_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    import collectives
    comm = collectives.init(timeout=60)
    for root in range(comm.size):
        got = comm.broadcast(f"from {root}" if comm.rank == root else None, root=root)
        assert got == f"from {root}", got
    t = torch.full((256,), float(comm.rank))
    comm.allreduce(t)
    assert bool((t == sum(range(comm.size))).all())
    big = torch.full((1 << 19,), float(comm.rank))  # 2 MiB: far messages, beside the rings
    got = comm.allgather(big)
    assert all(bool((x == r).all()) for r, x in enumerate(got))
    stats = comm.stats()
    report = dict(peers=stats["shm_peers"], sent=stats["shm_sent"],
                  received=stats["shm_received"], far=stats["far_read"])
    with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
        json.dump(report, f)
    comm.close()
    """
)


def _processes(tmp_path: Path, env: dict[str, str], n: int = 3) -> dict[int, dict[str, Any]]:
    return launched_world(tmp_path, _SCRIPT, env, n)


def test_processes_of_one_host_set_up_rings_when_their_world_forms(tmp_path: Path) -> None:
    reports = _processes(tmp_path, {})
    for r, rep in reports.items():
        assert rep["peers"] == [p for p in range(3) if p != r]
        assert rep["sent"] > 0 and rep["received"] > 0
        assert rep["far"] > 0


def test_turned_off_every_message_goes_through_the_socket(tmp_path: Path) -> None:
    reports = _processes(tmp_path, {shm_ring.ENV: "0"})
    for rep in reports.values():
        assert rep["peers"] == [] and rep["sent"] == 0 and rep["received"] == 0
        assert rep["far"] > 0  # cross-memory attach is a separate switch
