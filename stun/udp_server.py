"""The UDP socket (STUN and relay), driven by a dedicated thread or by asyncio.

``thread`` (the default) drains the non-blocking socket in a tight ``recvfrom``/``sendto`` loop
after one ``poll``; ``asyncio`` uses the event loop's ``DatagramProtocol``.  benchmarks/
stun_bench.py measures both; the thread keeps the relay off the loop that serves HTTP.
Registry writes from the thread (a new reflexive address) are handed to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from .registry import Addr
from .udp_core import UdpCore

log = logging.getLogger("comfycluster.stun.udp")
SOCKET_BUFFER = 4 * 1024 * 1024
DRAIN_BATCH = 256  # datagrams read per poll wake-up before checking for stop
POLL_MS = 250  # how often an idle thread looks at the stop flag


class UdpServer:
    def __init__(self, core: UdpCore, host: str, port: int, mode: str) -> None:
        self.core = core
        self.host = host
        self.requested_port = port
        self.mode = mode
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._stop = threading.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            # capped by net.core.[rw]mem_max; the kernel's default still works
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.bind((self.host, self.requested_port))
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        if self.mode == "asyncio":
            self.core.post = lambda fn: fn()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self.core), sock=sock
            )
            self._transport = transport
            self.core.send = self._send_asyncio
        else:

            def post(fn: Callable[[], None]) -> None:
                loop.call_soon_threadsafe(fn)

            self.core.post = post
            self.core.send = self._send_socket
            self._thread = threading.Thread(target=self._run, name="stun-udp", daemon=True)
            self._thread.start()
        log.info("UDP (STUN and relay) on %s:%s, %s mode", self.host, self.port, self.mode)

    def _send_socket(self, data: bytes, addr: Addr) -> None:
        assert self._sock is not None
        try:
            self._sock.sendto(data, addr)
        except OSError:  # a full send buffer or an unroutable address: UDP drops, we count
            self.core.counters.send_errors += 1

    def _send_asyncio(self, data: bytes, addr: Addr) -> None:
        assert self._transport is not None
        self._transport.sendto(data, addr)

    def _run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        recv = sock.recvfrom
        handle = self.core.handle
        size = self.core.max_datagram + 1  # one byte more, to see that a datagram is too big
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        six = sock.family == socket.AF_INET6
        while not self._stop.is_set():
            if not poller.poll(POLL_MS):
                continue
            for _ in range(DRAIN_BATCH):
                try:
                    data, addr = recv(size)
                except BlockingIOError:
                    break
                except OSError:
                    if self._stop.is_set():
                        return
                    break
                try:
                    handle(data, addr[:2] if six else addr)
                except Exception:  # one bad datagram must not end the port
                    log.exception("UDP datagram from %s", addr)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if self._transport is not None:
            self._transport.close()
        elif self._sock is not None:
            self._sock.close()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, core: UdpCore) -> None:
        self.core = core

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.core.handle(data, addr[:2])
        except Exception:
            log.exception("UDP datagram from %s", addr)

    def error_received(self, exc: Exception) -> None:
        self.core.counters.send_errors += 1
