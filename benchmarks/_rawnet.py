"""Plain sockets between the ranks of a benchmark world: the floor a socket backend is held to.

Two meshes, both on loopback, set up once per world through the world's own communicator (an
object allgather of port numbers: setup only, never timed):

* TCP: one connection per pair of ranks, ``TCP_NODELAY``, kernel-tuned buffers;
* UDP: per ordered pair a connected socket at each end, so a receive socket only ever holds one
  sender's datagrams and bytes can land straight in the destination buffer.  Data goes out as
  GSO batches of ``segment``-byte datagrams (``UDP_SEGMENT``) and comes in GRO-coalesced
  (``UDP_GRO``), as in docs' BASELINE method; the receiver grants credit back on the same pair
  of sockets (window flow control), which is what keeps loopback from dropping: the window stays
  well under the receive buffer.  No loss recovery: a lost datagram stops the transfer with an
  error instead of a number, because a baseline that retransmits is a transport, not a floor.

``pump_tcp`` / ``pump_udp`` move one phase of an op: every send and receive of this rank at
once, from one thread, so ranks that send and receive together (allgather) never deadlock.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103  # linux/udp.h: the GSO segment size of one sendmsg
UDP_GRO = 104  # linux/udp.h: let the kernel coalesce received datagrams
SEGMENT = 1200  # the WAN-safe datagram payload the udp backend defaults to
GSO_MAX_BYTES = 65000  # one sendmsg stays under the 64 KiB IP datagram limit
SOCKET_BUFFER = 4 << 20  # rmem_max/wmem_max here; the kernel caps what we ask for
STALL_S = 5.0  # no progress for this long: a datagram was lost (or a peer died)
_CREDIT = struct.Struct("!Q")  # cumulative bytes received from this pair, ever

Exchange = Callable[[Any], list[Any]]  # an allgather of small objects (the world's own)
Phase = tuple[list[tuple[int, memoryview]], list[tuple[int, memoryview]]]  # (sends, receives)


class RawNetError(RuntimeError):
    """A raw baseline could not move its bytes (loss, a closed peer): no figure for it."""


def byte_view(array: Any) -> memoryview:
    """A flat writable byte view of a numpy array (or anything with the buffer protocol)."""
    return memoryview(array).cast("B")


@dataclass
class TcpMesh:
    rank: int
    peers: dict[int, socket.socket]

    @classmethod
    def build(cls, rank: int, size: int, exchange: Exchange) -> TcpMesh:
        listener = socket.create_server((HOST, 0), backlog=max(size, 1))
        ports = exchange(listener.getsockname()[1])
        peers: dict[int, socket.socket] = {}
        # Higher ranks dial lower ones; the kernel queues the connections until accept(),
        # so dialling everyone first and accepting after cannot deadlock.
        for peer in range(rank):
            conn = socket.create_connection((HOST, ports[peer]))
            conn.sendall(struct.pack("!I", rank))
            peers[peer] = conn
        for _ in range(rank + 1, size):
            conn, _addr = listener.accept()
            peers[struct.unpack("!I", _recv_exact(conn, 4))[0]] = conn
        listener.close()
        for conn in peers.values():
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(rank, peers)

    def close(self) -> None:
        for conn in self.peers.values():
            conn.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = conn.recv_into(view)
        if not got:
            raise RawNetError("a raw TCP peer closed its connection")
        view = view[got:]
    return bytes(buf)


def pump_tcp(mesh: TcpMesh, phase: Phase) -> None:
    """Move one phase over TCP.  A lone transfer is one blocking call (what plain code would
    write, and the fastest); several go through one poll loop with non-blocking calls."""
    sends, recvs = phase
    if len(sends) + len(recvs) == 1:
        if sends:
            peer, view = sends[0]
            mesh.peers[peer].sendall(view)
        else:
            peer, view = recvs[0]
            conn = mesh.peers[peer]
            while view:
                got = conn.recv_into(view)
                if not got:
                    raise RawNetError(f"raw TCP peer {peer} closed its connection")
                view = view[got:]
        return
    out: dict[int, list[Any]] = {mesh.peers[p].fileno(): [mesh.peers[p], v] for p, v in sends if v}
    inn: dict[int, list[Any]] = {mesh.peers[p].fileno(): [mesh.peers[p], v] for p, v in recvs if v}
    poller = select.poll()
    for fd in out.keys() | inn.keys():
        poller.register(fd, _mask(fd, out, inn))
    while out or inn:
        events = poller.poll(STALL_S * 1000)
        if not events:
            raise RawNetError(f"raw TCP made no progress for {STALL_S:.0f} s")
        for fd, event in events:
            if fd in out and event & (select.POLLOUT | select.POLLERR):
                conn, view = out[fd]
                with contextlib.suppress(BlockingIOError):
                    view = view[conn.send(view, socket.MSG_DONTWAIT) :]
                if view:
                    out[fd][1] = view
                else:
                    del out[fd]
            if fd in inn and event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                conn, view = inn[fd]
                try:
                    got = conn.recv_into(view, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    got = -1
                if got == 0:
                    raise RawNetError("a raw TCP peer closed its connection")
                view = view[max(got, 0) :]
                if view:
                    inn[fd][1] = view
                else:
                    del inn[fd]
            mask = _mask(fd, out, inn)
            if mask:
                poller.modify(fd, mask)
            else:
                poller.unregister(fd)


def _mask(fd: int, out: dict[int, Any], inn: dict[int, Any]) -> int:
    return (select.POLLOUT if fd in out else 0) | (select.POLLIN if fd in inn else 0)


@dataclass
class _UdpPair:
    """This rank's two sockets for one peer, and the cumulative counts of both directions."""

    out: socket.socket  # data to the peer; its credits come back here
    inn: socket.socket  # the peer's data; our credits go back from here
    sent: int = 0
    credited: int = 0
    received: int = 0
    granted: int = 0


@dataclass
class UdpMesh:
    rank: int
    segment: int
    window: int  # bytes a sender may have outstanding towards one receiver
    pairs: dict[int, _UdpPair] = field(default_factory=dict)

    @classmethod
    def build(cls, rank: int, size: int, exchange: Exchange, segment: int = SEGMENT) -> UdpMesh:
        socks: dict[int, tuple[socket.socket, socket.socket]] = {}
        mine: dict[int, tuple[int, int]] = {}
        rcvbuf = SOCKET_BUFFER
        for peer in range(size):
            if peer == rank:
                continue
            out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            inn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            inn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            inn.setsockopt(SOL_UDP, UDP_GRO, 1)
            # The kernel reports twice what it grants; half of that is the payload budget.
            rcvbuf = min(rcvbuf, inn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2)
            for s in (out, inn):
                s.bind((HOST, 0))
            socks[peer] = (out, inn)
            mine[peer] = (out.getsockname()[1], inn.getsockname()[1])
        table = exchange(mine)
        mesh = cls(rank, segment, window=max(segment * 8, rcvbuf // 2))
        for peer, (out, inn) in socks.items():
            their_out, their_in = table[peer][rank]
            out.connect((HOST, their_in))
            inn.connect((HOST, their_out))
            mesh.pairs[peer] = _UdpPair(out, inn)
        return mesh

    def close(self) -> None:
        for pair in self.pairs.values():
            pair.out.close()
            pair.inn.close()


def pump_udp(mesh: UdpMesh, phase: Phase) -> None:
    """Move one phase as GSO/GRO datagram blasts under window flow control."""
    sends, recvs = phase
    gso = (GSO_MAX_BYTES // mesh.segment) * mesh.segment
    seg_cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("@H", mesh.segment))]
    credit_at = max(mesh.segment, mesh.window // 4)
    # fd -> [pair, the view still to move]
    out: dict[int, list[Any]] = {
        mesh.pairs[p].out.fileno(): [mesh.pairs[p], v] for p, v in sends if v
    }
    inn: dict[int, list[Any]] = {
        mesh.pairs[p].inn.fileno(): [mesh.pairs[p], v] for p, v in recvs if v
    }
    poller = select.poll()
    for fd in out:
        poller.register(fd, select.POLLOUT | select.POLLIN)
    for fd in inn:
        poller.register(fd, select.POLLIN)
    while out or inn:
        events = poller.poll(STALL_S * 1000)
        if not events:
            raise RawNetError(
                f"raw UDP made no progress for {STALL_S:.0f} s: datagrams were lost "
                "(receive buffer overrun); no figure for this cell"
            )
        for fd, event in events:
            if fd in out:
                pair, view = out[fd]
                _take_credit(pair)
                room = mesh.window - (pair.sent - pair.credited)
                if room >= min(len(view), mesh.segment):
                    size = min(len(view), gso, room)
                    if size < len(view):
                        size -= size % mesh.segment  # whole datagrams until the tail
                    try:
                        if size > mesh.segment:
                            pair.out.sendmsg([view[:size]], seg_cmsg, socket.MSG_DONTWAIT)
                        else:
                            pair.out.send(view[:size], socket.MSG_DONTWAIT)
                        pair.sent += size
                        view = view[size:]
                        room -= size
                    except BlockingIOError:
                        pass
                if view:
                    out[fd][1] = view
                    # Out of credit: wait for a credit datagram, not for send-buffer room.
                    poller.modify(fd, select.POLLIN if room < mesh.segment else select.POLLOUT)
                else:
                    del out[fd]
                    poller.unregister(fd)
            elif fd in inn and event & select.POLLIN:
                pair, view = inn[fd]
                try:
                    got = pair.inn.recvmsg_into([view], 64, socket.MSG_DONTWAIT)[0]
                except BlockingIOError:
                    continue
                pair.received += got
                view = view[got:]
                if pair.received - pair.granted >= credit_at or not view:
                    with contextlib.suppress(BlockingIOError):
                        pair.inn.send(_CREDIT.pack(pair.received), socket.MSG_DONTWAIT)
                        pair.granted = pair.received
                if view:
                    inn[fd][1] = view
                else:
                    del inn[fd]
                    poller.unregister(fd)


def _take_credit(pair: _UdpPair) -> None:
    """Read every credit datagram waiting; they are cumulative, so the last one counts."""
    while True:
        try:
            data = pair.out.recv(_CREDIT.size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if len(data) == _CREDIT.size:
            pair.credited = max(pair.credited, _CREDIT.unpack(data)[0])


def phases_for(
    op: str, rank: int, size: int, root: int, views: Mapping[str, Sequence[memoryview]]
) -> list[Phase]:
    """The transfers of ``op`` as plain code would do them: flat, root to each peer or each peer
    to root, everyone to everyone for allgather.  Reductions only move their bytes (to the root,
    and back for allreduce): the sum is the op's work, not the wire's.

    ``views``: "tensor" [this rank's block], "blocks" [N blocks] where the op has them,
    "scratch" [one receive block per peer at the root] for reductions.
    """
    t = views["tensor"][0]
    blocks = views.get("blocks", [])
    scratch = views.get("scratch", [])
    others = [p for p in range(size) if p != rank]
    is_root = rank == root
    from_root: Phase = ([(p, t) for p in others], []) if is_root else ([], [(root, t)])
    if op == "broadcast":
        return [from_root]
    if op == "scatter":
        return [([(p, blocks[p]) for p in others], [])] if is_root else [([], [(root, t)])]
    if op == "gather":
        return [([], [(p, blocks[p]) for p in others])] if is_root else [([(root, t)], [])]
    if op == "allgather":
        return [([(p, t) for p in others], [(p, blocks[p]) for p in others])]
    if op in ("reduce", "allreduce", "barrier"):
        to_root: Phase = ([], [(p, scratch[p]) for p in others]) if is_root else ([(root, t)], [])
        return [to_root] if op == "reduce" else [to_root, from_root]
    if op == "p2p":
        if rank == 0:
            return [([(1, t)], [])]
        return [([], [(0, t)])] if rank == 1 else []
    raise ValueError(f"no plain-socket schedule for {op!r}")
