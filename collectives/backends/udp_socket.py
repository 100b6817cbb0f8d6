"""The UDP socket of the ``udp`` backend: bound to exactly one address, with big kernel buffers
and Linux UDP GSO/GRO where the kernel has them.

Why each setting:

* **Bind exactly the address given.**  A wildcard bind would answer on every interface; the
  caller names the interface (discovery works it out), so nothing else is exposed.
* **Socket buffers.**  A burst the receiving process has not read yet is dropped by the kernel
  once ``SO_RCVBUF`` is full, and every such drop costs a retransmission.  We ask for
  :data:`BUFFER_REQUEST` bytes, then ``SO_*BUFFORCE`` (granted only with ``CAP_NET_ADMIN``), and
  log the sysctl that raises the limit (``net.core.rmem_max`` / ``wmem_max``) when the kernel
  grants less than :data:`BUFFER_WANTED`.  The granted sizes are reported in ``comm.stats()``.
* **GSO (``UDP_SEGMENT``, 103).**  One ``sendmsg`` hands the kernel up to 64 datagrams of one
  size; per-datagram syscalls cost more than the data they carry at 1200 bytes.  Where the
  kernel refuses it (old kernels, a device without checksum offload: ``EIO``), the socket falls
  back to one ``sendto`` per datagram for the rest of its life.
* **GRO (``UDP_GRO``, 104).**  The kernel coalesces datagrams of one flow into one read and says
  the segment size in a control message, which is handed to the core as ``segment_size``.
* **Datagram size.**  On loopback there is no path MTU, so :data:`LOOPBACK_DATAGRAM` bytes per
  datagram cost one syscall for what would be 54 datagrams of 1200; anywhere else
  :data:`DEFAULT_DATAGRAM` (safe over VPNs and IPv6 tunnels).  ``COMFY_CLUSTER_UDP_MTU``
  overrides both (the UDP payload size, not the link MTU).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from collectives.auth import is_loopback
from collectives.errors import ConfigurationError

log = logging.getLogger(__name__)

MTU_ENV = "COMFY_CLUSTER_UDP_MTU"
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33

DEFAULT_DATAGRAM = 1200
LOOPBACK_DATAGRAM = 65000
MIN_DATAGRAM = 512
MAX_DATAGRAM = 65000
# A GSO send carries at most 64 segments and at most one IP packet's worth of bytes (the kernel
# checks both); a GRO read returns at most that much.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
RECV_BYTES = 65535
BUFFER_REQUEST = 16 << 20
BUFFER_WANTED = 4 << 20

Address = tuple[str, int]
# One datagram read: (payload, source, GRO segment size or None for a single datagram).
Received = tuple[bytes, Address, int | None]


def max_datagram_for(host: str, environ: Mapping[str, str]) -> int:
    """The UDP payload per datagram for a socket bound to ``host`` (see the module docstring)."""
    raw = environ.get(MTU_ENV, "").strip()
    if not raw:
        return LOOPBACK_DATAGRAM if is_loopback(host) else DEFAULT_DATAGRAM
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not MIN_DATAGRAM <= value <= MAX_DATAGRAM:
        raise ConfigurationError(
            f"{MTU_ENV}={raw!r} is not a UDP payload size in {MIN_DATAGRAM}..{MAX_DATAGRAM}: set "
            f"it to the bytes per datagram the path carries (1200 is safe almost everywhere)"
        )
    return value


@dataclass
class SocketInfo:
    """What the socket got from the kernel (reported by ``comm.stats()``)."""

    rcvbuf: int
    sndbuf: int
    gso: bool
    gro: bool
    max_datagram: int


class UdpSocket:
    """A non-blocking UDP socket bound to ``host:port`` (port 0: the kernel picks one)."""

    def __init__(self, host: str, port: int, *, max_datagram: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as err:
            self.sock.close()
            raise ConfigurationError(
                f"udp backend: cannot bind {host}:{port} ({err.strerror or err}): set "
                "COMFY_CLUSTER_LISTEN_ADDRESS to an address of this host and "
                "COMFY_CLUSTER_DIRECT_LISTEN_PORT to a free port (0: any)"
            ) from None
        self.sock.setblocking(False)
        bound = self.sock.getsockname()
        self.address: Address = (str(bound[0]), int(bound[1]))
        rcvbuf = _grow(self.sock, socket.SO_RCVBUF, _SO_RCVBUFFORCE, "net.core.rmem_max")
        sndbuf = _grow(self.sock, socket.SO_SNDBUF, _SO_SNDBUFFORCE, "net.core.wmem_max")
        self.info = SocketInfo(rcvbuf, sndbuf, _has_gso(self.sock), False, max_datagram)
        self.info.gro = _enable_gro(self.sock)
        self._ancbuf = socket.CMSG_SPACE(4) if self.info.gro else 0

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- receive -------------------------------------------------------------------------------
    def receive(self, limit: int) -> list[Received]:
        """Up to ``limit`` reads that are ready now (never blocks).  Each is a fresh ``bytes``:
        the core may keep views of a partial frame, so a shared buffer is never reused."""
        out: list[Received] = []
        sock = self.sock
        for _ in range(limit):
            try:
                data, anc, _flags, addr = sock.recvmsg(RECV_BYTES, self._ancbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                # ICMP errors (a peer's port closed) surface here on some kernels; the core's
                # peer timeout is what declares a peer lost, so they are only skipped.
                if err.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                raise
            segment = None
            for level, kind, value in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
                    width = 4 if len(value) >= 4 else 2
                    segment = int.from_bytes(value[:width], sys.byteorder)
            if segment is not None and segment >= len(data):
                segment = None  # one datagram, not a batch
            out.append((data, (str(addr[0]), int(addr[1])), segment))
        return out

    # -- send ----------------------------------------------------------------------------------
    def send_batch(self, addr: Address, payload: memoryview, segment: int) -> int:
        """Send ``payload`` (datagrams of ``segment`` bytes, the last may be shorter) to
        ``addr``; the number of bytes the kernel took (a multiple of ``segment`` unless all),
        stopping at a full socket buffer (the caller keeps the rest and waits for POLLOUT)."""
        total = payload.nbytes
        sent = 0
        while sent < total:
            if self.info.gso and total - sent > segment:
                count = min(
                    GSO_MAX_SEGMENTS, GSO_MAX_BYTES // segment, -(-(total - sent) // segment)
                )
                end = min(total, sent + count * segment)
                if count > 1:
                    if not self._send_gso(payload[sent:end], addr, segment):
                        if not self.info.gso:
                            continue  # GSO just turned out unsupported: resend without it
                        return sent
                    sent = end
                    continue
            end = min(total, sent + segment)
            try:
                self.sock.sendto(payload[sent:end], addr)
            except (BlockingIOError, InterruptedError):
                return sent
            except OSError as err:
                if not _transient(err):
                    raise
                # A datagram the network refused right away is as good as lost: recovery
                # resends it.
            sent = end
        return sent

    def _send_gso(self, chunk: memoryview, addr: Address, segment: int) -> bool:
        cmsg = [(SOL_UDP, UDP_SEGMENT, segment.to_bytes(2, sys.byteorder))]
        try:
            self.sock.sendmsg([chunk], cmsg, 0, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as err:
            if err.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                log.info("udp: UDP GSO refused (%s); sending one datagram per syscall", err)
                self.info.gso = False
                return False
            if not _transient(err):
                raise
        return True

    def close(self) -> None:
        self.sock.close()


def _transient(err: OSError) -> bool:
    return err.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPERM)


def _grow(sock: socket.socket, option: int, force: int, sysctl: str) -> int:
    """Ask for :data:`BUFFER_REQUEST` bytes of buffer; the size granted (as the kernel reports
    it: Linux doubles the request for its bookkeeping)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_REQUEST)
    granted = sock.getsockopt(socket.SOL_SOCKET, option)
    if granted < BUFFER_REQUEST and sys.platform.startswith("linux"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, BUFFER_REQUEST)
            granted = sock.getsockopt(socket.SOL_SOCKET, option)
        except OSError:
            pass  # no CAP_NET_ADMIN: the sysctl limit stands
    if granted < BUFFER_WANTED:
        log.warning(
            "udp: the kernel granted a %d-byte socket buffer (asked for %d): bursts will be "
            "dropped and resent; raise it with: sysctl -w %s=%d",
            granted,
            BUFFER_REQUEST,
            sysctl,
            BUFFER_REQUEST,
        )
    return int(granted)


def _has_gso(sock: socket.socket) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def _enable_gro(sock: socket.socket) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


__all__ = [
    "DEFAULT_DATAGRAM",
    "LOOPBACK_DATAGRAM",
    "MTU_ENV",
    "Address",
    "Received",
    "SocketInfo",
    "UdpSocket",
    "max_datagram_for",
]
