"""gloo backend tests that form no world: registration, rendezvous errors, envelope layout."""

from __future__ import annotations

import importlib
import socket
import threading
import time
from typing import Any

import pytest

SLACK_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(**kw: Any) -> Any:
    from collectives.backends.base import BackendConfig

    return BackendConfig(**kw)


@pytest.mark.gloo
def test_registered_and_available() -> None:
    importlib.import_module("torch.distributed")  # installed by setup.sh: fail if absent
    from collectives.backends.base import get_backend_class, registered_backends
    from collectives.backends.torch_dist import TorchBackend
    from collectives.backends.torch_nccl import NcclBackend

    backends = registered_backends()
    assert backends["gloo"] is True
    assert "nccl" in backends
    assert get_backend_class("gloo") is TorchBackend
    if not NcclBackend.is_available():
        assert "CUDA" in NcclBackend.unavailable_reason() or "NCCL" in (
            NcclBackend.unavailable_reason()
        )


@pytest.mark.gloo
@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        ({"X": "1"}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT"),
    ],
)
def test_missing_rendezvous_variables(environ: dict[str, str], missing: str) -> None:
    importlib.import_module("torch.distributed")  # installed by setup.sh: fail if absent
    from collectives.backends.torch_dist import TorchBackend
    from collectives.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=missing):
        TorchBackend.create(_config(rank=0, size=2, environ=environ, timeout=5))


@pytest.mark.gloo
def test_rendezvous_names_missing_master() -> None:
    importlib.import_module("torch.distributed")  # installed by setup.sh: fail if absent
    from collectives.backends.torch_dist import TorchBackend
    from collectives.errors import RendezvousTimeoutError

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    start = time.monotonic()
    with pytest.raises(RendezvousTimeoutError, match="rank 0 never opened"):
        TorchBackend.create(_config(rank=1, size=2, environ=env, timeout=1.0))
    assert time.monotonic() - start < 1.0 + SLACK_S


@pytest.mark.gloo
def test_rendezvous_names_missing_ranks() -> None:
    import torch.distributed as dist

    from collectives.backends.torch_dist import TorchBackend
    from collectives.backends.torch_rendezvous import waiting_for
    from collectives.errors import RendezvousTimeoutError

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    seen: list[list[int]] = []

    def watch() -> None:
        while not stop.is_set():
            seen.append(waiting_for("w7"))
            time.sleep(0.05)

    stop = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        with pytest.raises(RendezvousTimeoutError, match=r"rank\(s\) 1, 2 of 3 never arrived"):
            TorchBackend.create(_config(rank=0, size=3, environ=env, timeout=1.0, world="w7"))
    finally:
        stop.set()
        watcher.join()
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert not dist.is_initialized()
    assert [1, 2] in seen, seen  # what a status page shows while it waits
    assert waiting_for("w7") == []


@pytest.mark.gloo
def test_world_of_one_needs_no_address() -> None:
    import torch
    import torch.distributed as dist

    import collectives

    # Nothing else in this test process initialises torch.distributed (ranks run in subprocesses).
    assert not dist.is_initialized(), "an earlier test left torch.distributed initialised"
    with collectives.init("gloo", rank=0, size=1, environ={"X": "1"}, timeout=10) as comm:
        t = torch.arange(4, dtype=torch.bfloat16)
        comm.allreduce(t, op="avg")
        assert t.tolist() == [0, 1, 2, 3]
        assert comm.allgather("x") == ["x"]
        assert dist.is_initialized()
    assert not dist.is_initialized(), "close() must destroy the group it created"


@pytest.mark.gloo
def test_envelope_inlines_small_messages_only() -> None:
    importlib.import_module("torch")  # installed by setup.sh: fail if absent
    import torch

    from collectives.backends.envelope import Envelope
    from collectives.backends.torch_messages import ENVELOPE_BYTES, INLINE_AT, outgoing
    from collectives.codec import encode

    env = Envelope("broadcast", 7, 0, comm=5, epoch=2)
    small = outgoing(encode({"a": 1}), env).parts
    assert len(small) == 1 and small[0].numel() == ENVELOPE_BYTES
    assert Envelope.unpack_from(small[0].numpy()) == env  # the shared envelope leads
    big = outgoing(encode(torch.zeros(1000)), env).parts
    assert [t.numel() for t in big] == [ENVELOPE_BYTES, 4000]
    many = outgoing(encode([torch.zeros(1) for _ in range(80)]), env._replace(op="gather")).parts
    assert many[1].numel() > ENVELOPE_BYTES - INLINE_AT  # the header itself travels separately


def test_envelope_leaves_large_buffers_to_a_reader_that_can_read_this_process() -> None:
    import struct

    import torch

    from collectives.backends import cma, envelope
    from collectives.backends.envelope import Envelope
    from collectives.backends.torch_messages import ENVELOPE_BYTES, outgoing
    from collectives.codec import encode

    tensors = [torch.zeros(10), torch.ones(cma.MIN_BYTES // 4), torch.zeros(cma.MIN_BYTES)]
    msg = encode(tensors)
    sent = outgoing(msg, Envelope("gather", 3, 0)).parts
    assert [t.numel() for t in sent] == [ENVELOPE_BYTES, cma.MIN_BYTES, 4 * cma.MIN_BYTES]
    read = outgoing(msg, Envelope("gather", 3, 0), readable=True)
    assert [t.numel() for t in read.parts] == [ENVELOPE_BYTES]  # the small one rides inline
    assert [v.nbytes for v in read.remote] == [cma.MIN_BYTES, 4 * cma.MIN_BYTES]
    env = read.parts[0].numpy()
    assert struct.unpack_from("<I", env, envelope.SIZE + 4)[0] == 2  # k
    tail = struct.unpack_from("<2Q", env, ENVELOPE_BYTES - 16)
    assert list(tail) == [tensors[1].data_ptr(), tensors[2].data_ptr()]


def test_an_envelope_asking_to_read_an_unprobed_process_is_refused() -> None:
    import os
    from types import SimpleNamespace

    import torch

    from collectives.backends import cma
    from collectives.backends.envelope import Envelope
    from collectives.backends.torch_messages import Incoming, outgoing
    from collectives.codec import CodecOptions, encode
    from collectives.errors import RemoteProtocolError

    mine = Envelope("gather", 3, 0)
    env = outgoing(encode(torch.zeros(cma.MIN_BYTES)), mine, readable=True).parts[0]
    inc = Incoming.__new__(Incoming)  # only the envelope check: no engine, no world
    inc.engine = SimpleNamespace(rank=0, cma_sources={1: os.getpid() + 1})  # type: ignore[assignment]
    inc.src, inc.expect, inc.codec, inc._env = 1, mine, CodecOptions(), env.numpy().copy()
    with pytest.raises(RemoteProtocolError, match="not the process it showed"):
        inc._open_envelope()
    inc.engine.cma_sources = {1: os.getpid()}  # the pid this rank showed at the probe
    inc._open_envelope()
    inc.engine.cma_sources = {}  # a rank this process never probed
    with pytest.raises(RemoteProtocolError):
        inc._open_envelope()


def test_an_envelope_announcing_a_header_beyond_the_codec_limits_is_refused() -> None:
    import struct
    from types import SimpleNamespace

    import torch

    from collectives.backends import envelope
    from collectives.backends.envelope import Envelope
    from collectives.backends.torch_messages import Incoming, outgoing
    from collectives.codec import CodecOptions, encode, header_limit
    from collectives.errors import CollectiveMismatchError, RemoteProtocolError

    mine = Envelope("send", 0, comm=7)
    env = outgoing(encode(torch.zeros(4)), mine).parts[0].numpy().copy()
    inc = Incoming.__new__(Incoming)  # only the envelope checks: no engine, no world
    inc.engine = SimpleNamespace(rank=0, cma_sources={})  # type: ignore[assignment]
    inc.src, inc.expect, inc.codec, inc._env = 1, mine, CodecOptions(max_buffers=100), env
    inc._open_envelope()
    struct.pack_into("<I", env, envelope.SIZE, header_limit(inc.codec) + 16)  # header length
    with pytest.raises(RemoteProtocolError, match="max_buffers=100"):
        inc._open_envelope()
    inc.expect = mine._replace(root=2)
    with pytest.raises(CollectiveMismatchError, match="root 2"):
        inc._open_envelope()
