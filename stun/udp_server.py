"""The UDP socket (STUN and relay), driven by a dedicated thread or by asyncio.

``thread`` (the default) drains the non-blocking socket in a tight ``recvfrom``/``sendto`` loop
after one ``poll``; ``asyncio`` uses the event loop's ``DatagramProtocol``.  benchmarks/
stun_bench.py measures both; the thread keeps the relay off the loop that serves HTTP.
Registry writes from the thread (a new reflexive address) are handed to the loop.

On Linux the thread also turns on ``UDP_GRO``: the kernel hands it up to 64 datagrams of one flow
in one read, with their size in a control message, and :meth:`UdpCore.relay_batch` forwards such
a batch with one ``UDP_SEGMENT`` (GSO) send.  Without them (another OS, an old kernel, a device
that refuses GSO: ``EIO``) every datagram takes its own ``recvfrom``/``sendto``.  asyncio mode
never enables GRO: its protocol callback would get coalesced datagrams without their size.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from collectives.backends.udp_socket import (
    SOL_UDP,
    UDP_SEGMENT,
    enable_gro,
    gro_segment,
    has_gso,
)

from .registry import Addr
from .udp_core import UdpCore

log = logging.getLogger("comfycluster.stun.udp")
SOCKET_BUFFER = 4 * 1024 * 1024
DRAIN_BATCH = 256  # datagrams read per poll wake-up before checking for stop
POLL_MS = 250  # how often an idle thread looks at the stop flag
GSO_MAX_SEGMENTS = 64  # the kernel refuses a segmented send of more
GSO_MAX_BYTES = 65000  # and one of more than an IP packet's payload
RECV_BYTES = 65535  # a GRO read returns at most this much
_GSO_REFUSED = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP)


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
        self.gro = False  # the thread reads GRO batches (and forwards them segmented)
        self.gso = False

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
            self.gro = enable_gro(sock)
            self.gso = self.gro and has_gso(sock)
            if self.gso:
                self.core.send_batch = self._send_segmented
            self._thread = threading.Thread(target=self._run, name="stun-udp", daemon=True)
            self._thread.start()
        log.info("UDP (STUN and relay) on %s:%s, %s mode%s", self.host, self.port, self.mode,
                 ", GRO/GSO batches" if self.gso else "")  # fmt: skip

    def _send_socket(self, data: bytes, addr: Addr) -> None:
        assert self._sock is not None
        try:
            self._sock.sendto(data, addr)
        except OSError:  # a full send buffer or an unroutable address: UDP drops, we count
            self.core.counters.send_errors += 1

    def _send_segmented(self, view: memoryview, segment: int, addr: Addr) -> None:
        """``view`` as datagrams of ``segment`` bytes, with as few GSO sends as the kernel
        allows; datagram by datagram once the kernel refused GSO."""
        assert self._sock is not None
        sendmsg = self._sock.sendmsg
        total = len(view)
        step = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // segment)) * segment
        cmsg = [(SOL_UDP, UDP_SEGMENT, segment.to_bytes(2, sys.byteorder))]
        for at in range(0, total, step):
            if not self.gso:
                self.core.send_each(view[at:], segment, addr)
                return
            chunk = view[at : at + step]
            try:
                sendmsg([chunk], cmsg if len(chunk) > segment else [], 0, addr)
            except OSError as err:
                if err.errno in _GSO_REFUSED:
                    log.info("UDP GSO refused (%s): relaying one datagram per send", err)
                    self.gso = False
                    self.core.send_each(chunk, segment, addr)
                else:  # a full send buffer or an unroutable address: UDP drops, we count
                    self.core.counters.send_errors += 1

    def _send_asyncio(self, data: bytes, addr: Addr) -> None:
        assert self._transport is not None
        self._transport.sendto(data, addr)

    def _run(self) -> None:
        """Wait for datagrams, then read up to ``DRAIN_BATCH`` of them (or GRO batches) before
        waiting again; one bad datagram never ends the port."""
        assert self._sock is not None
        sock = self._sock
        read = self._gro_reader(sock) if self.gro else self._plain_reader(sock)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(POLL_MS):
                continue
            for _ in range(DRAIN_BATCH):
                try:
                    read()
                except BlockingIOError:
                    break
                except OSError:
                    if self._stop.is_set():
                        return
                    break

    def _plain_reader(self, sock: socket.socket) -> Callable[[], None]:
        """Reads and handles one datagram (raises the socket's errors)."""
        recv, handle = sock.recvfrom, self.core.handle
        size = self.core.max_datagram + 1  # one byte more, to see that a datagram is too big
        six = sock.family == socket.AF_INET6

        def read() -> None:
            data, addr = recv(size)
            try:
                handle(data, addr[:2] if six else addr)
            except Exception:
                log.exception("UDP datagram from %s", addr)

        return read

    def _gro_reader(self, sock: socket.socket) -> Callable[[], None]:
        """The same with ``recvmsg_into`` and the GRO segment size of each read: a batch of
        equal segments goes to the relay at once."""
        buf = bytearray(RECV_BYTES)
        ancsize = socket.CMSG_SPACE(4)
        recv = sock.recvmsg_into
        handle, relay_batch = self.core.handle, self.core.relay_batch
        six = sock.family == socket.AF_INET6

        def read() -> None:
            n, anc, _flags, addr = recv([buf], ancsize)
            source = addr[:2] if six else addr
            try:
                segment = gro_segment(anc)
                if segment is not None and 0 < segment < n:
                    relay_batch(buf, n, segment, source)
                else:
                    handle(bytes(buf[:n]), source)
            except Exception:
                log.exception("UDP datagram from %s", addr)

        return read

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
