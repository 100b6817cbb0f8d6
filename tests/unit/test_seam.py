"""The point-to-point seam's contract (collectives/backends/p2p.py), on the local backend."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from collectives.backends import local
from collectives.backends.base import BackendConfig, OpContext
from collectives.backends.envelope import NO_ROOT, Envelope
from collectives.backends.local import LocalBackend
from collectives.backends.p2p import COLLECTIVE_CHANNEL, byte_view, lands_in
from collectives.codec import CodecOptions, Encoded, decode, encode
from collectives.deadline import Deadline
from collectives.errors import CodecError, CollectiveMismatchError, RemoteProtocolError
from collectives.testing import run_local


def _world(size: int = 2, epoch: int = 0) -> list[LocalBackend]:
    name = f"seam-{uuid.uuid4().hex}"
    cfg = [BackendConfig(rank=r, size=size, world=name, epoch=epoch) for r in range(size)]
    return [LocalBackend.create(c) for c in cfg]


@pytest.fixture
def pair() -> Iterator[list[LocalBackend]]:
    backends = _world()
    yield backends
    for b in backends:
        b.close()


def _dl(seconds: float = 5.0) -> Deadline:
    return Deadline.start(seconds, "test", 0)


def _posted_receive(
    b: LocalBackend, into: memoryview
) -> tuple[threading.Thread, list[tuple[Envelope, Encoded]]]:
    """Rank 1 receiving from rank 0 on channel "c" into ``into``, in a thread, once its receive
    is posted (a landing waits for the sender); what it took lands in the list."""
    got: list[tuple[Envelope, Encoded]] = []
    receiver = threading.Thread(target=lambda: got.append(b._take(0, "c", _dl(), into)))
    receiver.start()
    deadline = time.monotonic() + 5
    while (1, 0, "c") not in b._world.landings:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return receiver, got


def _expired() -> Deadline:
    return Deadline(time.monotonic() - 1.0, 1.0, "test", 0)


def _value(msg: Encoded) -> Any:
    return decode(msg.header, msg.buffers)


def test_post_never_waits_for_the_receiver(pair: list[LocalBackend]) -> None:
    a, b = pair
    env = a.envelope("broadcast", 0, 0)
    # Even with its deadline already past, posting to a peer that never takes succeeds at once.
    for i in range(200):
        a._post(1, COLLECTIVE_CHANNEL, env, encode(i), _expired())
    assert b._has_message(0, COLLECTIVE_CHANNEL)


def test_fifo_per_sender_and_channel(pair: list[LocalBackend]) -> None:
    a, b = pair
    env = a.envelope("x", 0)
    for i in range(5):
        a._post(1, "c", env, encode(i), _dl())
    a._post(1, "other", env, encode("o"), _dl())
    assert _value(b._take(0, "other", _dl())[1]) == "o"  # channels are independent
    assert [_value(b._take(0, "c", _dl())[1]) for _ in range(5)] == list(range(5))
    assert not b._has_message(0, "c")


def test_post_owns_the_message_before_returning(pair: list[LocalBackend]) -> None:
    a, b = pair
    t = torch.arange(8, dtype=torch.float32)
    a._post(1, "c", a.envelope("x", 0), encode(t), _dl())
    t.fill_(-1)  # the caller reuses its buffer at once
    got = _value(b._take(0, "c", _dl())[1])
    assert torch.equal(got, torch.arange(8, dtype=torch.float32))


def _count_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    copies: list[int] = []
    real = local._copy_into

    def counting(out: memoryview, buf: memoryview) -> None:
        copies.append(buf.nbytes)
        real(out, buf)

    monkeypatch.setattr(local, "_copy_into", counting)
    return copies


def test_waiting_receive_gets_the_payload_in_one_copy(
    pair: list[LocalBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    copies = _count_copies(monkeypatch)
    out = torch.zeros(1000, dtype=torch.bfloat16)
    ptr = out.data_ptr()
    into = byte_view(out)
    assert into is not None
    receiver, got = _posted_receive(b, into)
    src = torch.arange(1000).to(torch.bfloat16)
    a._post(1, "c", a.envelope("x", 0), encode(src), _dl())
    receiver.join(5)
    assert copies == [2000], "one copy, sender's buffer -> receiver's tensor"
    msg = got[0][1]
    value = decode(msg.header, msg.buffers)
    assert value.data_ptr() == ptr and out.data_ptr() == ptr
    assert torch.equal(out, src)


def test_a_claimed_landing_is_returned_before_a_later_queued_message(
    pair: list[LocalBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sender T1 claims the waiting receive's buffer and copies slowly; meanwhile T2 (same
    sender, channel) finds no landing and queues.  The receive must return T1's message (posted
    first), only once T1's copy is complete, and leave T2's for the next receive."""
    a, b = pair
    real = local._copy_into
    copying, release = threading.Event(), threading.Event()

    def slow_first(out: memoryview, buf: memoryview) -> None:
        if not copying.is_set():  # T1's copy straight into the receiver's buffer
            copying.set()
            assert release.wait(5)
        real(out, buf)

    monkeypatch.setattr(local, "_copy_into", slow_first)
    out = torch.zeros(256, dtype=torch.float32)
    into = byte_view(out)
    assert into is not None
    receiver, got = _posted_receive(b, into)
    first, second = torch.full((256,), 1.0), torch.full((256,), 2.0)
    t1 = threading.Thread(target=a._post, args=(1, "c", a.envelope("x", 0), encode(first), _dl()))
    t1.start()
    assert copying.wait(5)
    a._post(1, "c", a.envelope("x", 1), encode(second), _dl())  # T2: queued behind T1
    receiver.join(0.5)  # the receive must still be waiting for T1's copy
    returned_early = not receiver.is_alive()
    release.set()
    t1.join(5)
    receiver.join(5)
    assert not returned_early, "the receive returned while T1 was still writing its buffer"
    env, msg = got[0]
    assert env.seq == 0 and torch.equal(_value(msg), first) and torch.equal(out, first)
    env, msg = b._take(0, "c", _dl())
    assert env.seq == 1 and torch.equal(_value(msg), second)
    assert not b._has_message(0, "c")


def test_message_that_arrives_first_still_lands_in_the_buffer(
    pair: list[LocalBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    copies = _count_copies(monkeypatch)
    src = torch.arange(64, dtype=torch.int64)
    a._post(1, "c", a.envelope("x", 0), encode(src), _dl())
    out = torch.zeros(64, dtype=torch.int64)
    _, msg = b._take(0, "c", _dl(), byte_view(out))
    assert copies == [512, 512]  # into the mailbox when posted, into the tensor when taken
    assert decode(msg.header, msg.buffers).data_ptr() == out.data_ptr()
    assert torch.equal(out, src)


def test_non_fitting_messages_do_not_land(pair: list[LocalBackend]) -> None:
    a, b = pair
    out = torch.zeros(4)
    into = byte_view(out)
    assert into is not None
    for msg in (encode(torch.ones(5)), encode([1, 2]), encode(b"x" * 16)):
        assert not lands_in(msg.header, into.nbytes)
        a._post(1, "c", a.envelope("x", 0), msg, _dl())
        b._take(0, "c", _dl(), into)
    assert torch.equal(out, torch.zeros(4))


def test_recv_into_lands_in_the_callers_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    copies = _count_copies(monkeypatch)

    def fn(comm: Any) -> object:
        if comm.rank == 0:
            comm.recv(1, tag=1)  # rank 1's recv_into is posted by now (it sent this first)
            comm.send_buffer(torch.arange(256, dtype=torch.float32), 1)
            return None
        out = torch.zeros(256, dtype=torch.float32)
        ptr = out.data_ptr()
        work = comm.irecv_into(out, 0)
        deadline = time.monotonic() + 5
        while not comm.engine._world.landings:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        comm.send("ready", 0, tag=1)
        assert work.wait() is out and out.data_ptr() == ptr
        return out

    out = run_local(2, fn)[1]
    assert torch.equal(out, torch.arange(256, dtype=torch.float32))
    assert copies.count(1024) == 1, copies


def _ctx(name: str, seq: int) -> OpContext:
    return OpContext(name, seq, _dl(2.0))


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (Envelope("gather", 3, 1), CollectiveMismatchError),  # op
        (Envelope("broadcast", 4, 1), CollectiveMismatchError),  # seq
        (Envelope("broadcast", 3, 0), CollectiveMismatchError),  # root
        (Envelope("broadcast", 3, 1, epoch=1), RemoteProtocolError),  # epoch
        (Envelope("broadcast", 3, 1, comm=12345), RemoteProtocolError),  # communicator
    ],
)
def test_mismatched_envelopes_are_refused(
    pair: list[LocalBackend], sent: Envelope, error: type[Exception]
) -> None:
    a, b = pair
    if sent.comm != 12345:
        sent = sent._replace(comm=a.comm_id)
    a._post(1, COLLECTIVE_CHANNEL, sent, encode("data"), _dl())
    link = b._link(_ctx("broadcast", 3), root=1)
    with pytest.raises(error) as info:
        link.recv(0)
    assert error is not CollectiveMismatchError or "rank 1" in str(info.value)


def test_envelope_names_world_epoch_and_root() -> None:
    (a,) = _world(1, epoch=7)
    env = a.envelope("barrier", 9)
    assert (env.root, env.epoch, env.comm) == (NO_ROOT, 7, a.comm_id)
    assert Envelope.unpack_from(env.pack()) == env
    a.close()


# -- the backend's codec options reach every decode -------------------------------------------
DETONATED: list[str] = []


def _detonate() -> None:
    DETONATED.append("unpickled!")


class _Bomb:
    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _detonate, ()


BOMB = encode(_Bomb(), CodecOptions(allow_pickle=True))


def _poison(comm: Any) -> None:
    """Every data message this rank posts becomes a pickle frame (agreement rounds excepted)."""
    real = comm.engine._post

    def post(dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        real(dst, channel, env, BOMB if channel != "k" else msg, dl)

    comm.engine._post = post


def _t() -> torch.Tensor:
    return torch.ones(4)


# (what rank 0, the poisoned sender, does; what rank 1, the receiver, does)
OPS: dict[str, tuple[Callable[[Any], object], Callable[[Any], object]]] = {
    "recv": (lambda c: c.send(1, 1), lambda c: c.recv(0)),
    "recv_into": (lambda c: c.send_buffer(_t(), 1), lambda c: c.recv_into(_t(), 0)),
    "broadcast": (lambda c: c.broadcast(1, root=0), lambda c: c.broadcast(root=0)),
    "gather": (lambda c: c.gather(1, root=1), lambda c: c.gather(1, root=1)),
    "allgather": (lambda c: c.allgather(1), lambda c: c.allgather(1)),
    "scatter": (lambda c: c.scatter([1, 2], root=0), lambda c: c.scatter(root=0)),
    "broadcast_into": (
        lambda c: c.broadcast_into(_t(), root=0),
        lambda c: c.broadcast_into(_t(), root=0),
    ),
    "gather_into": (
        lambda c: c.gather_into(None, _t(), root=1),
        lambda c: c.gather_into(torch.zeros(2, 4), _t(), root=1),
    ),
    "gatherv_into": (
        lambda c: c.gatherv_into(None, _t(), root=1),
        lambda c: c.gatherv_into([_t(), _t()], _t(), root=1),
    ),
    "allgather_into": (
        lambda c: c.allgather_into(torch.zeros(2, 4), _t()),
        lambda c: c.allgather_into(torch.zeros(2, 4), _t()),
    ),
    "scatter_into": (
        lambda c: c.scatter_into(_t(), torch.zeros(2, 4), root=0),
        lambda c: c.scatter_into(_t(), root=0),
    ),
    "reduce": (lambda c: c.reduce(_t(), root=1), lambda c: c.reduce(_t(), root=1)),
    "allreduce": (lambda c: c.allreduce(_t()), lambda c: c.allreduce(_t())),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_pickle_frame_is_refused_and_never_unpickled(op: str) -> None:
    send, receive = OPS[op]

    def fn(comm: Any) -> str:
        if comm.rank == 0:
            _poison(comm)
            try:
                send(comm)
            except Exception as err:  # the receiver leaves once it has refused the message
                return type(err).__name__
            return "sent"
        with pytest.raises(CodecError):
            receive(comm)
        comm.abort("refused the pickle")
        return "refused"

    DETONATED.clear()
    assert run_local(2, fn, op_timeout=5.0, close=False)[1] == "refused"
    assert not DETONATED
