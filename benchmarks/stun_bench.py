"""Rendezvous server throughput: heartbeats/s over HTTP, relay datagrams/s and Mbit/s over UDP.

    python -m benchmarks.stun_bench [--seconds 5] [--modes thread,asyncio] [--batch 53]
                                    [--json out.json]

The server runs as a real ``python -m stun`` process pinned to one core (CPU 0); the load comes
from this process and its helpers pinned to the other cores.  Heartbeats are sent by raw
keep-alive HTTP/1.1 connections (a full client library would be the bottleneck, not the server).
The relay is measured twice per UDP mode: flat out (what one core can forward, the rest is
dropped by the kernel), and paced at the target of 4 ranks x 100 Mbit/s (1200-byte payloads).
In ``thread`` mode it is measured again with the ranks sending as the udp backend does: GSO
batches (``UDP_SEGMENT``) of ``--batch`` relay datagrams, received with ``UDP_GRO`` (0: skip).
Server CPU time comes from /proc, so each figure is also given per CPU-second of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import platform
import select
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from aioice import stun

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-key-0123456789abcdef"
ADMIN = "bench-admin-0123456789abcdef"
PAYLOAD = 1200
TARGET_MBIT_PER_RANK = 100.0
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104


def _progress(text: str) -> None:
    print(f"[stun_bench] {text}", file=sys.stderr, flush=True)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpus: set[int]) -> None:
    usable = os.sched_getaffinity(0)
    os.sched_setaffinity(0, (cpus & usable) or usable)


class Server:
    def __init__(self, udp_mode: str) -> None:
        self.port = _free_port(socket.SOCK_STREAM)
        self.udp_port = _free_port(socket.SOCK_DGRAM)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFY_", "STUN_"))}
        env.update(
            {
                "PYTHONPATH": str(REPO),
                "COMFY_CLUSTER_AUTH_KEYS": ",".join(f"c{i}:{KEY}" for i in range(4)),
                "COMFY_CLUSTER_STUN_ADMIN_KEY": ADMIN,
                "COMFY_CLUSTER_STUN_LOG_LEVEL": "warning",
                "COMFY_CLUSTER_STUN_RATE_PER_IP": "1000000",
                "COMFY_CLUSTER_STUN_RATE_PER_CLUSTER": "1000000",
                "COMFY_CLUSTER_STUN_RELAY_PPS": "1000000",
                "COMFY_CLUSTER_STUN_UDP_MODE": udp_mode,
            }
        )
        args = [sys.executable, "-m", "stun", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--udp-host", "127.0.0.1", "--udp-port", str(self.udp_port)]
        self.proc = subprocess.Popen(args, cwd=REPO, env=env)
        os.sched_setaffinity(self.proc.pid, {0} & os.sched_getaffinity(0) or {0})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError("the server did not start within 30 s")

    def cpu_s(self) -> float:
        """CPU time of all the server's threads, in ns resolution (schedstat, not clock ticks)."""
        tasks = Path(f"/proc/{self.proc.pid}/task").glob("*/schedstat")
        return sum(int(t.read_text().split()[0]) for t in tasks) / 1e9

    def stats(self) -> dict[str, int]:
        r = httpx.get(self.url + "/v1/stats", headers={"X-Admin-Key": ADMIN}, timeout=10)
        return dict(r.json()["udp"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# -- heartbeats ---------------------------------------------------------------------------------


async def _hammer(port: int, requests: list[bytes], seconds: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    end = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < end:
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"heartbeat answered {head[:40]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            counts[0] += 1
    finally:
        writer.close()


def heartbeats(server: Server, seconds: float, connections: int, members: int) -> dict[str, Any]:
    ids = []
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for n in range(members):
            cluster, iid = f"c{n % 4}", f"m{n}"
            r = c.post(
                f"/v1/clusters/{cluster}/join",
                json={"instance_id": iid},
                headers={"X-Cluster-Key": KEY},
            )
            r.raise_for_status()
            ids.append((cluster, iid))
    requests = [
        (
            f"POST /v1/clusters/{cluster}/heartbeat/{iid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-Cluster-Key: {KEY}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        for cluster, iid in ids
    ]
    counts = [0]

    async def run() -> None:
        await asyncio.gather(
            *(
                _hammer(server.port, requests[k::connections], seconds, counts)
                for k in range(connections)
            )
        )

    cpu0, t0 = server.cpu_s(), time.monotonic()
    try:
        import uvloop  # the client must not be the bottleneck: it shares no core with the server

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    wall, cpu = time.monotonic() - t0, server.cpu_s() - cpu0
    return {
        "connections": connections,
        "members": members,
        "seconds": round(wall, 2),
        "heartbeats": counts[0],
        "per_s": round(counts[0] / wall),
        "server_cpu_share": round(cpu / wall, 2),
        "per_server_cpu_s": round(counts[0] / cpu) if cpu > 0 else None,
        "server_cpu_s_per_heartbeat_us": round(cpu / counts[0] * 1e6, 1) if counts[0] else None,
    }


# -- relay --------------------------------------------------------------------------------------


def _ranks(server: Server) -> list[tuple[socket.socket, bytes]]:
    out = []
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for n in range(4):
            r = c.post(
                "/v1/clusters/c0/join",
                json={"instance_id": f"relay{n}", "rank": 60 + n},
                headers={"X-Cluster-Key": KEY},
            )
            r.raise_for_status()
            body = r.json()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind(("127.0.0.1", 0))
            s.settimeout(2)
            req = stun.Message(
                stun.Method.BINDING, stun.Class.REQUEST, attributes={"USERNAME": f"c0:relay{n}"}
            )
            req.add_message_integrity(base64.urlsafe_b64decode(body["token"]))
            s.sendto(bytes(req), ("127.0.0.1", server.udp_port))
            s.recv(2048)
            out.append((s, bytes.fromhex(body["handle"])))
    time.sleep(0.2)
    return out


def relay(server: Server, seconds: float, pps: float, batch: int = 1) -> dict[str, Any]:
    """pps 0: flat out.  Frames leave from the ranks' own STUN-registered sockets (the relay
    forwards only from a registered address): child processes send on inherited copies.
    ``batch`` > 1: each send is a GSO batch of that many frames, and the ranks read with GRO."""
    ranks = _ranks(server)
    frames = [bytes([0xCC, 0x01]) + ranks[(n + 1) % 4][1] + bytes(PAYLOAD) for n in range(4)]
    if batch > 1:
        for s, _ in ranks:
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
    stop = time.monotonic() + seconds
    received = [0]

    def drain() -> None:
        poller = select.poll()
        for s, _ in ranks:
            s.setblocking(False)
            poller.register(s.fileno(), select.POLLIN)
        by_fd = {s.fileno(): s for s, _ in ranks}
        buf = bytearray(65535)
        anc = socket.CMSG_SPACE(4)
        while time.monotonic() < stop + 0.5:
            for fd, _ in poller.poll(100):
                sock = by_fd[fd]
                while True:
                    try:
                        n, cmsg, _, _ = sock.recvmsg_into([buf], anc)
                    except BlockingIOError:
                        break
                    if buf[:2] == b"\xcc\x01":
                        seg = next((int.from_bytes(v[:2], sys.byteorder) for _, _, v in cmsg), n)
                        received[0] += -(-n // seg)

    before, cpu0, t0 = server.stats(), server.cpu_s(), time.monotonic()
    # one child process sends for all four ranks, on inherited copies of their sockets
    sent_count = mp.Value("q", 0)
    fds = [s.fileno() for s, _ in ranks]
    sender = mp.Process(
        target=_rank_sender, args=(fds, server.udp_port, frames, seconds, pps, batch, sent_count)
    )
    drainer = threading.Thread(target=drain)
    drainer.start()
    sender.start()
    sender.join(seconds + 30)
    drainer.join(seconds + 30)
    wall, cpu = time.monotonic() - t0, server.cpu_s() - cpu0
    after = server.stats()
    sent = int(sent_count.value)
    forwarded = after["relay_forwarded"] - before["relay_forwarded"]
    dropped = {
        k: after[k] - before[k] for k in after if k != "relay_bytes" and after[k] != before[k]
    }
    dropped.pop("relay_forwarded", None)
    dropped.pop("relay_batches", None)
    for s, _ in ranks:
        s.close()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for n in range(4):
            c.delete(f"/v1/clusters/c0/members/relay{n}", headers={"X-Cluster-Key": KEY})
    return {
        "offered_pps": round(sent / seconds),
        "forwarded_pps": round(forwarded / seconds),
        "received_pps": round(received[0] / seconds),
        "forwarded_mbit_s": round(forwarded * PAYLOAD * 8 / seconds / 1e6, 1),
        "gso_batches_in": after.get("relay_batches", 0) - before.get("relay_batches", 0),
        "loss": round(1 - received[0] / sent, 4) if sent else None,
        "server_cpu_share": round(cpu / wall, 2),
        "server_cpu_us_per_datagram": round(cpu / forwarded * 1e6, 2) if forwarded else None,
        "server_drops": dropped,
    }


def _rank_sender(
    fds: list[int], port: int, frames: list[bytes], seconds: float, pps: float, batch: int,
    out: Any,
) -> None:  # fmt: skip
    _pin(set(range(1, os.cpu_count() or 2)))
    socks = [socket.socket(fileno=os.dup(fd)) for fd in fds]
    dest = ("127.0.0.1", port)
    if batch > 1:
        cmsg = [(SOL_UDP, UDP_SEGMENT, len(frames[0]).to_bytes(2, sys.byteorder))]
        bufs = [[f * batch] for f in frames]
        msgs = [s.sendmsg for s in socks]

        def send(i: int) -> None:
            msgs[i](bufs[i], cmsg, 0, dest)

    else:
        sends = [s.sendto for s in socks]

        def send(i: int) -> None:
            sends[i](frames[i], dest)

    sent, start = 0, time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * pps) if pps > 0 else sent + 64 * batch
        while sent < due:
            try:  # noqa: SIM105 (a with-block per datagram costs more than the send)
                send((sent // batch) & 3)
            except BlockingIOError:  # the copies share the drain thread's non-blocking mode
                pass
            sent += batch
        if pps > 0:
            time.sleep(0.0005)
    out.value = sent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--modes", default="thread,asyncio")
    p.add_argument("--batch", type=int, default=53, help="relay datagrams per GSO send (0: skip)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    _pin(set(range(1, os.cpu_count() or 2)))
    target_pps = 4 * TARGET_MBIT_PER_RANK * 1e6 / 8 / PAYLOAD
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "payload_bytes": PAYLOAD,
        "target_relay_pps": round(target_pps),
        "modes": {},
    }
    for mode in args.modes.split(","):
        server = Server(mode)
        try:
            entry: dict[str, Any] = {}
            if mode == args.modes.split(",")[0]:
                _progress(f"{mode}: heartbeats, {args.connections} connections, {args.seconds} s")
                entry["heartbeats"] = heartbeats(
                    server, args.seconds, args.connections, args.members
                )
                _progress(f"  {entry['heartbeats']['per_s']} heartbeats/s")
            _progress(f"{mode}: relay flat out, {args.seconds} s")
            entry["relay_max"] = top = relay(server, args.seconds, 0)
            _progress(f"  forwarded {top['forwarded_pps']}/s ({top['forwarded_mbit_s']} Mbit/s)")
            _progress(f"{mode}: relay paced at {round(target_pps)} datagrams/s (4 x 100 Mbit/s)")
            entry["relay_target"] = paced = relay(server, args.seconds, target_pps)
            _progress(f"  forwarded {paced['forwarded_pps']}/s, loss {paced['loss']}")
            if mode == "thread" and args.batch > 1:
                _progress(f"{mode}: relay flat out, GSO batches of {args.batch}")
                entry["relay_max_batched"] = top = relay(server, args.seconds, 0, args.batch)
                _progress(
                    f"  forwarded {top['forwarded_pps']}/s ({top['forwarded_mbit_s']} Mbit/s)"
                )
                _progress(f"{mode}: relay paced at the target, GSO batches of {args.batch}")
                entry["relay_target_batched"] = paced = relay(
                    server, args.seconds, target_pps, args.batch
                )
                _progress(f"  forwarded {paced['forwarded_pps']}/s, loss {paced['loss']}")
            result["modes"][mode] = entry
        finally:
            server.stop()
    out = args.json or REPO / "benchmarks" / "results" / f"stun-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    _progress(f"written to {out}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    sys.exit(main())
