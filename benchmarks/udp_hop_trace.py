"""Where one small message's time goes on the udp backend: a timeline of a 2-rank ping-pong.

``python -m benchmarks.udp_hop_trace [--iters 3000] [--bytes 1024]`` starts two ranks on
loopback (env rendezvous) that ping-pong ``--bytes`` with ``send_buffer`` / ``recv_into``.  Each
rank stamps, on the one monotonic clock both processes share, the driver's steps: the post
reaching the IO driver (``Engine.send``), the ``sendto`` of its datagram, the read that brings
the answer in, the end of the turn that handed it over (core and inbox), and the call's return.
It prints the median of each step, so the one-way time splits into the layers above the driver,
the driver and sans-IO core, the kernel, and the receive side.  A scratch tool like
:mod:`benchmarks.udp_latency_probe`, not a benchmark of record: the stamps cost ~0.3 us each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Marks = list[tuple[str, int]]


def _always(result: object) -> bool:
    return True


def _stamp(
    marks: Marks, cls: type, name: str, tag: str, *, only: Callable[[Any], bool] = _always
) -> None:
    """Wrap ``cls.name`` so that each call appends ``(tag + ">", start)`` and ``(tag + "<",
    end)`` when it returns a value ``only`` accepts (a read that found nothing is no step)."""
    inner = getattr(cls, name)
    clock = time.perf_counter_ns

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        result = inner(*args, **kwargs)
        if only(result):
            marks.append((tag + ">", start))
            marks.append((tag + "<", clock()))
        return result

    setattr(cls, name, wrapped)


def _rank_main(out: Path, iters: int, nbytes: int) -> None:
    import numpy as np
    import torch

    from collectives.backends import udp_io, udp_socket
    from collectives.world import init

    comm = init("udp", timeout=60.0)
    marks: Marks = []
    _stamp(marks, udp_io.Engine, "send", "driver send")
    _stamp(marks, udp_socket.UdpSocket, "_send_one", "sendto")
    _stamp(marks, udp_socket.UdpSocket, "read_into", "read", only=lambda r: r is not None)
    _stamp(marks, udp_io.Engine, "_turn", "turn")
    buf = torch.from_numpy(np.full(nbytes, 1, dtype=np.uint8))
    rows = []
    clock = time.perf_counter_ns
    for i in range(iters):
        marks.clear()
        row: dict[str, Any] = {"start": clock()}
        if comm.rank == 0:
            comm.send_buffer(buf, 1)
            comm.recv_into(buf, 1)
        else:
            comm.recv_into(buf, 0)
            row["received"] = clock()  # rank 1 answers: the end of rank 0's one way
            comm.send_buffer(buf, 0)
        row["marks"] = list(marks)
        if i >= iters // 10:  # warm-up left out
            rows.append(row)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(rows))
    comm.close()


def _first(marks: Marks, tag: str, after: int = 0) -> int | None:
    return next((t for name, t in marks if name == tag and t >= after), None)


def _report(out: Path) -> list[tuple[str, float]]:
    """Median microseconds of each step of one way, rank 0 sending and rank 1 answering."""
    sender = json.loads((out / "rank0.json").read_text())
    receiver = json.loads((out / "rank1.json").read_text())
    steps: dict[str, list[float]] = {}

    def add(name: str, a: int | None, b: int | None) -> None:
        if a is not None and b is not None:
            steps.setdefault(name, []).append((b - a) / 1e3)

    for s, r in zip(sender, receiver, strict=False):
        sm, rm = s["marks"], r["marks"]
        driver, sendto_in = _first(sm, "driver send>"), _first(sm, "sendto>")
        sendto_out = _first(sm, "sendto<")
        read = _first(rm, "read<")
        turn_end = _first(rm, "turn<", read or 0)
        add("send_buffer called -> driver (communicator, seam, codec)", s["start"], driver)
        add("driver -> sendto (core: frame and seal; pump)", driver, sendto_in)
        add("sendto", sendto_in, sendto_out)
        add("sendto returned -> peer's read returned (kernel, wakeup)", sendto_out, read)
        add("read -> turn done (core: open and parse; inbox)", read, turn_end)
        add("turn done -> recv_into returns (take, place)", turn_end, r.get("received"))
        add("one way in all", s["start"], r.get("received"))
    return [(name, statistics.median(v)) for name, v in steps.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--bytes", type=int, default=1024)
    ap.add_argument("--rank-main", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_main:
        _rank_main(Path(args.rank_main), args.iters, args.bytes)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="udp-hop-") as tmp:
        procs = []
        for rank in range(2):
            # Rings off: two ranks of one host would bypass the socket path this traces.
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       COMFY_CLUSTER_SHM="0")  # fmt: skip
            cmd = [sys.executable, "-m", "benchmarks.udp_hop_trace", "--rank-main", tmp,
                   "--iters", str(args.iters), "--bytes", str(args.bytes)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        if any(p.wait(timeout=600) for p in procs):
            raise SystemExit("a rank failed")
        for name, us in _report(Path(tmp)):
            print(f"{us:8.1f} us  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
