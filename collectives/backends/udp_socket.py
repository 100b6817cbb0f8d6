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
* **ICMP port unreachable** (``IP_RECVERR``, Linux; :meth:`UdpSocket.report_unreachable`,
  outside NAT traversal).  An unconnected UDP socket hears nothing of ICMP errors by default, so
  a peer whose process died was noticed only after the peer timeout (30 s).  With the option the
  kernel queues each error with the destination it concerns; the reads that report it collect
  those destinations in :attr:`UdpSocket.unreachable` for the core, which treats them as a hint
  (ICMP is not authenticated): see ``Endpoint.unreachable``.
"""

from __future__ import annotations

import contextlib
import ctypes
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
_MSG_TRUNC = int(socket.MSG_TRUNC)  # an int: ``&`` on the IntFlag costs microseconds per read
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_MSG_ERRQUEUE = 0x2000
_UNREACHABLE_KEPT = 64  # destinations kept until the driver takes them (a burst repeats them)

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
_PR_SET_TIMERSLACK = 29
_TIMER_SLACK_NS = 1000

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
        self.info = SocketInfo(rcvbuf, sndbuf, has_gso(self.sock), False, max_datagram)
        self.info.gro = enable_gro(self.sock)
        self._ancbuf = socket.CMSG_SPACE(4) if self.info.gro else 0
        self.refused = 0  # reads that returned an ICMP error instead of a datagram
        # Destinations an ICMP port unreachable came back for (report_unreachable), oldest first.
        self.unreachable: list[Address] = []
        self._recverr = False

    def report_unreachable(self) -> bool:
        """Ask the kernel for ICMP errors with the destination they concern (``IP_RECVERR``);
        whether it agreed (Linux only).  Not in NAT traversal: probes to dead candidates draw
        ICMP errors that say nothing about a peer."""
        if not sys.platform.startswith("linux"):
            return False
        v6 = self.sock.family == socket.AF_INET6
        level, option = (
            (socket.IPPROTO_IPV6, _IPV6_RECVERR) if v6 else (socket.IPPROTO_IP, _IP_RECVERR)
        )
        try:
            self.sock.setsockopt(level, option, 1)
        except OSError:
            return False
        self._recverr = True
        return True

    def _drain_errors(self) -> None:
        """Read the kernel's error queue dry (with ``IP_RECVERR`` a queued error keeps the
        socket readable until it is read), keeping the destinations of port-unreachable ones."""
        if not self._recverr:
            return
        while True:
            try:
                _data, anc, _flags, addr = self.sock.recvmsg(0, 256, _MSG_ERRQUEUE)
            except OSError:
                return  # EAGAIN: the queue is empty
            for _level, _kind, value in anc:
                # struct sock_extended_err: ee_errno (u32) first.
                if (
                    len(value) >= 4
                    and int.from_bytes(value[:4], sys.byteorder) == errno.ECONNREFUSED
                ):
                    dest = (str(addr[0]), int(addr[1]))
                    if dest not in self.unreachable and len(self.unreachable) < _UNREACHABLE_KEPT:
                        self.unreachable.append(dest)

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
                # ICMP errors (a peer's port closed): only a hint for the core (see
                # report_unreachable), never a reason to stop reading.
                if err.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self._drain_errors()
                    continue
                raise
            segment = gro_segment(anc)
            if segment is not None and segment >= len(data):
                segment = None  # one datagram, not a batch
            out.append((data, (str(addr[0]), int(addr[1])), segment))
        return out

    def read_into(self, buf: bytearray) -> tuple[int, Address, int | None] | None:
        """One read into ``buf`` (at least :data:`RECV_BYTES` long), or None when nothing is
        ready (never blocks): ``(bytes, source, GRO segment size or None)``.

        Why a caller-owned buffer: a fresh 64 KiB ``bytes`` per read costs an allocation and
        the core copies what it keeps (it keeps no view of a datagram once ``receive``
        returns), so the driver reads every datagram into one buffer.  A read that ended in an
        ICMP error (a peer's port closed, see :attr:`refused`) counts it and reports -1 bytes.
        A datagram longer than ``buf`` (never one of ours) is reported cut: the core drops it.
        """
        try:
            n, anc, flags, addr = self.sock.recvmsg_into([buf], self._ancbuf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            if err.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                self.refused += 1
                self._drain_errors()
                return -1, ("", 0), None
            raise
        segment = gro_segment(anc)
        if segment is not None and (segment >= n or flags & _MSG_TRUNC):
            segment = None
        return n, (addr if len(addr) == 2 else (addr[0], addr[1])), segment

    # -- send ----------------------------------------------------------------------------------
    def send_batch(self, addr: Address, payload: memoryview, segment: int) -> int:
        """Send ``payload`` (datagrams of ``segment`` bytes, the last may be shorter) to
        ``addr``; the number of bytes the kernel took (a multiple of ``segment`` unless all),
        stopping at a full socket buffer (the caller keeps the rest and waits for POLLOUT)."""
        total = payload.nbytes
        if total <= segment:
            # One datagram (every frame on loopback, where a datagram holds 65000 bytes): no
            # slicing and no GSO arithmetic: 4.5 us per 65000-byte send, 6.9 with them.
            return total if self._send_one(payload, addr) else 0
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
            if not self._send_one(payload[sent:end], addr):
                return sent
            sent = end
        return sent

    def _send_one(self, datagram: memoryview, addr: Address) -> bool:
        """Send one datagram; False when the socket buffer is full (nothing sent)."""
        try:
            self.sock.sendto(datagram, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as err:
            if not _transient(err):
                raise
            # A datagram the network refused right away is as good as lost: recovery resends
            # it.  The error may be an earlier datagram's ICMP error.
            self._drain_errors()
        return True

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
            self._drain_errors()
        return True

    def close(self) -> None:
        self.sock.close()


def fine_timer_slack() -> None:
    """Ask Linux for 1 us of timer slack on this thread (the default, 50 us, stretches every
    sub-millisecond wait of a pacing gap).  Per thread, harmless elsewhere: a no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, _TIMER_SLACK_NS, 0, 0, 0)


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


def has_gso(sock: socket.socket) -> bool:
    """Whether the kernel sends ``UDP_SEGMENT`` batches from ``sock`` (Linux 4.18+)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def enable_gro(sock: socket.socket) -> bool:
    """Ask for ``UDP_GRO`` on ``sock`` (Linux 5.0+): whether the kernel took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_segment(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The GRO segment size a ``recvmsg`` reported, or None (a single datagram)."""
    segment = None
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
            width = 4 if len(value) >= 4 else 2
            segment = int.from_bytes(value[:width], sys.byteorder)
    return segment


__all__ = [
    "DEFAULT_DATAGRAM",
    "LOOPBACK_DATAGRAM",
    "MTU_ENV",
    "Address",
    "Received",
    "SocketInfo",
    "UdpSocket",
    "enable_gro",
    "fine_timer_slack",
    "gro_segment",
    "has_gso",
    "max_datagram_for",
]
