"""Throughput of the udp transport's sans-IO core alone: two Endpoints in memory, no sockets.

Moves one large message from rank 0 to rank 1, handing each GSO batch to the receiver whole (as
a GRO read would), under the real clock (so pacing and timers behave as in a driver), and prints
GB/s per ``max_datagram``.  It measures the Python work per datagram and per frame (header
packing, sealing, reassembly, ACK processing): the ceiling of the udp backend on one core.

The send and receive buffers are allocated and touched once, before any timing, and reused by
every repeat: a fresh 64 MiB buffer costs a page fault per 4 KiB on first write, which would be
measured as transport time (the driver hands the core a waiting receive buffer, already touched).

``--small`` measures the other end: 1 KiB messages (80 bytes of meta) ping-ponged between the two
endpoints, each carrying the ACK of the one before (as a small op's traffic does), and prints the
core's CPU per message, both endpoints' sending and receiving together (the latency a small op
pays in the core).

    .venv/bin/python -m benchmarks.transport_core_bench [--mib 64] [--datagram 1200 65000]
        [--repeat 3] [--profile]
    .venv/bin/python -m benchmarks.transport_core_bench --small [--messages 20000] [--repeat 3]
        [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

from collectives.auth import ClusterKey
from collectives.transport import Endpoint, MessageReceived, MessageSent, TransportConfig
from collectives.transport.receiving import Allocator

ADDRS = [("127.0.0.1", 1), ("127.0.0.1", 2)]


def transfer(
    body: memoryview, into: memoryview, config: TransportConfig, key: ClusterKey | None
) -> tuple[float, float, dict[str, int], dict[str, int]]:
    """Seconds (wall, then CPU) to move ``body`` from rank 0 into ``into`` at rank 1 and see
    ``MessageSent``, with both endpoints' counters.  CPU seconds are what to compare on a busy
    machine: other processes inflate the wall time, not this process's CPU time."""
    nbytes = body.nbytes

    def allocate(peer: int, channel: int, meta: bytes, n: int) -> memoryview:
        return into[:n]  # a waiting receive buffer, as the driver's landing gives it

    clock = time.perf_counter
    eps = _pair(config, key, allocate)  # handshake first: what is timed is the transfer
    cpu_start = time.process_time()
    start = clock()
    eps[0].send(1, 0, b"bench", [body], start)
    sent = received = False
    pairs = [(eps[0], eps[1], ADDRS[0]), (eps[1], eps[0], ADDRS[1])]
    while not (sent and received):
        moved = 0
        for ep, other, src_addr in pairs:
            # A fresh clock reading per call: one shared ``now`` would make every RTT zero.
            for _addr, payload, seg in ep.datagrams_to_send(clock()):
                other.receive(payload, src_addr, clock(), seg)
                moved += 1
        now = clock()
        for ep in eps:
            timer = ep.get_timer()
            if timer is not None and timer <= now:
                ep.handle_timer(now)
            while (event := ep.next_event()) is not None:
                sent |= isinstance(event, MessageSent)
                received |= isinstance(event, MessageReceived)
        if not moved:
            timers = [t for ep in eps if (t := ep.get_timer()) is not None]
            if timers and min(timers) > clock():
                time.sleep(max(0.0, min(min(timers) - clock(), 0.001)))  # as a driver would
        if now - start > 600:
            raise TimeoutError("transfer did not finish in 600 s")
    elapsed = clock() - start
    cpu = time.process_time() - cpu_start
    if into[:16] != body[:16] or into[nbytes - 16 : nbytes] != body[-16:]:
        raise AssertionError("the body arrived corrupted")
    return elapsed, cpu, eps[0].stats(), eps[1].stats()


def _pair(
    config: TransportConfig, key: ClusterKey | None, allocate: Allocator | None = None
) -> list[Endpoint]:
    """Two endpoints of a 2-rank world, handshake done, keys confirmed both ways."""
    clock = time.perf_counter
    eps = [
        Endpoint(rank=r, size=2, comm_id=1, epoch=0, key=key, config=config, now=clock(),
                 allocate=allocate)
        for r in range(2)
    ]  # fmt: skip
    eps[0].add_peer(1, ADDRS[1], clock())
    eps[1].add_peer(0, None, clock())
    while eps[1].stats()["sessions"] == 0 or eps[0].stats()["frames_opened"] == 0:
        for src, ep in enumerate(eps):
            for addr, payload, seg in ep.datagrams_to_send(clock()):
                eps[ADDRS.index(addr)].receive(payload, ADDRS[src], clock(), seg)
    return eps


def ping_pong(eps: list[Endpoint], messages: int) -> None:
    """``messages`` 1 KiB messages, alternately from each endpoint to the other, each delivered
    (datagrams handed over, events taken, due timers run) before the next is sent."""
    clock = time.perf_counter
    body = [memoryview(bytes(1024))]
    meta = b"x" * 80
    received = 0
    for i in range(messages):
        src = i % 2
        sender, receiver = eps[src], eps[1 - src]
        sender.send(1 - src, 0, meta, body, clock())
        for _addr, payload, seg in sender.datagrams_to_send(clock()):
            receiver.receive(payload, ADDRS[src], clock(), seg)
        for ep in (receiver, sender):
            while (event := ep.next_event()) is not None:
                received += isinstance(event, MessageReceived)
        for ep in eps:
            timer = ep.get_timer()
            if timer is not None and timer <= clock():
                ep.handle_timer(clock())
    if received != messages:
        raise AssertionError(f"{received} of {messages} messages arrived")


def small(messages: int, repeat: int, profile: bool) -> None:
    """CPU per small message in the core (see the module docstring)."""
    config = TransportConfig(max_datagram=65000)
    key = ClusterKey("transport-core-bench-key-0123456789")
    eps = _pair(config, key)
    ping_pong(eps, 1000)  # warm up: the congestion model's first rounds, the image pool
    per_message = []
    for _ in range(max(1, repeat)):
        start = time.process_time()
        ping_pong(eps, messages)
        per_message.append((time.process_time() - start) / messages * 1e6)
    print(
        f"1 KiB ping-pong, {messages} messages: median {statistics.median(per_message):.1f} us"
        f" CPU per message (best {min(per_message):.1f}; send and receive, both ends)",
        flush=True,
    )
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(ping_pong, eps, min(messages, 5000))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="message size in MiB")
    parser.add_argument("--datagram", type=int, nargs="+", default=[1200, 65000])
    parser.add_argument("--frame-kib", type=int, default=64, help="frame_bytes in KiB")
    parser.add_argument("--window-mib", type=int, default=16, help="window_bytes in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="transfers per size (median)")
    parser.add_argument("--insecure", action="store_true", help="no encryption")
    parser.add_argument("--profile", action="store_true", help="cProfile one more transfer")
    parser.add_argument("--small", action="store_true", help="1 KiB ping-pong: CPU per message")
    parser.add_argument("--messages", type=int, default=20000, help="messages per --small run")
    args = parser.parse_args(argv)
    if args.small:
        small(args.messages, args.repeat, args.profile)
        return 0
    nbytes = args.mib * 1024 * 1024
    key = None if args.insecure else ClusterKey("transport-core-bench-key-0123456789")
    body = memoryview(bytearray(b"\x5a" * nbytes))
    into = memoryview(bytearray(b"\x00" * nbytes))  # touched: no page faults while timed
    print(f"moving {args.mib} MiB between two in-memory endpoints", flush=True)
    for size in args.datagram:
        config = TransportConfig(
            max_datagram=size,
            frame_bytes=args.frame_kib * 1024,
            window_bytes=args.window_mib * 1024 * 1024,
            insecure=args.insecure,
        )
        runs = [transfer(body, into, config, key) for _ in range(max(1, args.repeat))]
        seconds = [r[0] for r in runs]
        median = statistics.median(seconds)
        cpu = statistics.median(r[1] for r in runs)
        _, _, tx, rx = runs[-1]
        print(
            f"max_datagram={size:>5}: median {median:6.3f} s  {nbytes / median / 1e9:5.2f} GB/s"
            f"  (best {nbytes / min(seconds) / 1e9:5.2f},"
            f" CPU {nbytes / cpu / 1e9:5.2f})"
            f"  frames {tx['frames_sealed']}  datagrams {tx['datagrams_out']}"
            f"  acks back {rx['frames_sealed']}  resent {tx['retransmitted_segments']}",
            flush=True,
        )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(transfer, body, into, config, key)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
