"""The public face of the sans-IO core: one :class:`Endpoint` per rank and world incarnation.

No sockets, no clock, no threads: every input carries ``now`` (the driver's monotonic clock) and
every output is a return value (datagram batches, a timer, events).  The driver owns IO; see
docs/udp-transport.md for the contract, which this file implements.  Bad datagrams never raise:
each is dropped and counted in :meth:`Endpoint.stats`.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence

from collectives.auth import ClusterKey
from collectives.errors import (
    ConfigurationError,
    ConnectionLostError,
    InvalidArgumentError,
    LocalProtocolError,
)
from collectives.transport import handshake
from collectives.transport._pb import transport_pb2 as pb
from collectives.transport.config import TransportConfig
from collectives.transport.crypto import NONCE_SIZE, cluster_tag, session_ciphers
from collectives.transport.events import Address, Event, PeerConnected
from collectives.transport.frames import ChunkKind
from collectives.transport.header import (
    HEADER_SIZE,
    Header,
    HeaderError,
    PacketType,
    parse_header,
)
from collectives.transport.outbound import Batch
from collectives.transport.receiving import Allocator, default_allocate
from collectives.transport.sending import OutMessage
from collectives.transport.session import Session
from collectives.transport.states import Input, State, allowed

COUNTERS = (
    "datagrams_in",
    "datagrams_out",
    "bytes_in",
    "bytes_out",
    "frames_sealed",
    "frames_opened",
    "retransmitted_segments",
    "redundant_segments",
    "lost_segments",
    "probe_timeouts",
    "window_full",
    "paced",
    "dropped_malformed",
    "dropped_wrong_cluster",
    "dropped_foreign",
    "dropped_unknown_session",
    "dropped_auth",
    "dropped_replay",
    "dropped_duplicate",
    "dropped_overload",
    "handshakes",
    "peers_lost",
    "unreachable_hints",
)

_U32 = (1 << 32) - 1
_SEGMENT = int(PacketType.SEGMENT)  # a plain int compares faster than the IntEnum member
_LOST = State.LOST  # (a class attribute lookup per send otherwise)


class Endpoint:
    """This rank's end of every session of one world (see the module docstring)."""

    def __init__(
        self,
        *,
        rank: int,
        size: int,
        comm_id: int,
        epoch: int,
        key: ClusterKey | None,
        config: TransportConfig,
        now: float,
        allocate: Allocator | None = None,
        random: Callable[[int], bytes] = secrets.token_bytes,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if key is None and not config.insecure:
            raise ConfigurationError(
                "the udp transport needs the cluster key (COMFY_CLUSTER_KEY), or "
                "TransportConfig(insecure=True) on a network you trust"
            )
        if not 0 <= rank < size:
            raise InvalidArgumentError(f"rank {rank} is not in a world of {size}")
        self.rank = rank
        self.size = size
        self.comm_id = comm_id
        self.epoch = epoch
        self.config = config
        self._key = key
        self._tag = cluster_tag(key)
        self._tag_int = int.from_bytes(self._tag, "big")
        self._allocate = allocate or default_allocate
        self._random = random
        self._wall = wall_clock
        self._sessions: dict[int, Session] = {}
        self._by_id: dict[int, Session] = {}
        self._events: deque[Event] = deque()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._guard = handshake.ReplayGuard(config.hello_window)
        self._message_ids: dict[int, int] = {}
        self._channel_seq: dict[tuple[int, int], int] = {}
        self._closed = False
        self._now = now  # the latest time given: no timer is ever asked for before it

    # -- peers ------------------------------------------------------------------------------------

    def add_peer(self, peer: int, addr: Address | None, now: float) -> None:
        """Declare ``peer``; the lower rank of each pair opens the session (see the design)."""
        self._check_peer(peer)
        session = self._sessions.get(peer)
        if session is not None:
            if session.addr is None and addr is not None:
                session.addr = addr
            return
        is_client = self.rank < peer
        if is_client and addr is None:
            raise InvalidArgumentError(
                f"rank {self.rank} opens the session to rank {peer} and needs its address"
            )
        session = self._new_session(peer, is_client, addr, now)
        if is_client:
            session.client_nonce = self._random(NONCE_SIZE)
            hello = pb.Hello(
                cluster_tag=self._tag_int,
                from_rank=self.rank,
                to_rank=peer,
                comm_id=self.comm_id,
                epoch=self.epoch,
                client_nonce=session.client_nonce,
                client_session_id=session.local_id,
                timestamp=self._wall(),
                window_bytes=self.config.window_bytes,
            )
            session.hello = handshake.build(self._key, self._tag, PacketType.HELLO, 0, hello)
            session.hello_next = now
            session.fire(Input.OPEN)
        else:
            session.fire(Input.AWAIT)

    def set_peer_address(self, peer: int, addr: Address) -> None:
        """Where the session with ``peer`` sends from now on, without an event: a driver that
        chooses paths itself (NAT traversal) keeps the core on one stable address per peer, so
        datagrams that arrive by another path, or reordered across paths, never move it."""
        self._check_peer(peer)
        session = self._sessions.get(peer)
        if session is not None:
            session.addr = addr

    def unreachable(self, addr: Address, now: float) -> None:
        """An ICMP port unreachable came back for datagrams to ``addr`` (the driver read it from
        the socket).  Unauthenticated, so only a hint: each established peer at ``addr`` is
        PINGed and lost unless something authenticated comes from it within
        ``config.unreachable_grace`` (``PeerLost``), instead of after ``peer_timeout``."""
        self._tick(now)
        for session in self._sessions.values():
            if session.addr == addr:
                self._counters["unreachable_hints"] += 1
                session.unreachable(now)

    def reset_path(self, peer: int, now: float) -> None:
        """The driver moved ``peer``'s traffic to another network path: its RTT estimate and
        congestion model start over (RFC 9000 section 9.4), with the old smoothed RTT as the
        first guess so no probe timeout fires early.  Packets in flight stay accounted."""
        self._check_peer(peer)
        session = self._sessions.get(peer)
        out = None if session is None else session.out
        if out is None:
            return
        from collectives.transport.congestion import Bbr
        from collectives.transport.rtt import RttEstimator

        rec = out.recovery
        guess = max(rec.rtt.smoothed, rec.rtt.latest, self.config.initial_rtt / 10)
        rec.rtt = RttEstimator(guess)
        rec.congestion = Bbr(max_datagram=rec.max_datagram, initial_rtt=guess, now=now)
        rec.pacer.set_rate(rec.congestion.pacing_rate, now)

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.size or peer == self.rank:
            raise InvalidArgumentError(
                f"rank {self.rank}: peer {peer} is not another rank of a world of {self.size}"
            )

    def _new_session(self, peer: int, is_client: bool, addr: Address | None, now: float) -> Session:
        session = Session(
            peer=peer,
            is_client=is_client,
            addr=addr,
            local_id=self._new_session_id(),
            config=self.config,
            tag=self._tag,
            comm_id=self.comm_id,
            epoch=self.epoch,
            now=now,
            allocate=self._allocate,
            emit=self._events.append,
            counters=self._counters,
        )
        self._sessions[peer] = session
        self._by_id[session.local_id] = session
        return session

    def _new_session_id(self) -> int:
        while True:
            sid = int.from_bytes(self._random(8), "big")
            if sid and sid not in self._by_id:
                return sid

    # -- messages ---------------------------------------------------------------------------------

    def send(
        self,
        peer: int,
        channel: int,
        meta: bytes,
        body: Sequence[memoryview],
        now: float,
        *,
        notify_framed: bool = False,
    ) -> int:
        """Queue one message; the caller keeps ``body`` unchanged until ``MessageSent``, or until
        ``MessageFramed`` when ``notify_framed`` asks for that event (the core then holds the
        sealed frames and never reads ``body`` again)."""
        if self._closed:
            raise LocalProtocolError(f"rank {self.rank}: send on a closed transport endpoint")
        session = self._sessions.get(peer)
        if session is None:
            self._check_peer(peer)  # (a peer with a session passed it: only the error matters)
            raise InvalidArgumentError(f"rank {self.rank}: peer {peer} was never added")
        if session.state is _LOST:
            raise ConnectionLostError(f"rank {self.rank}: peer {peer} is gone", [peer])
        if len(meta) > self.config.max_meta:
            raise InvalidArgumentError(
                f"meta of {len(meta)} bytes is over max_meta={self.config.max_meta}"
            )
        if not 0 <= channel <= _U32:
            raise InvalidArgumentError(f"channel {channel} is not a 32-bit unsigned number")
        message_id = self._message_ids.get(peer, 0) + 1
        self._message_ids[peer] = message_id
        seq = self._channel_seq.get((peer, channel), 0)
        self._channel_seq[peer, channel] = seq + 1
        msg = OutMessage(message_id, channel, seq, bytes(meta), body, notify_framed=notify_framed)
        out = session.out  # session.queue(msg), inlined: once per message
        if out is None:
            session.queue(msg)
        else:
            out.queue.append(msg)
        return message_id

    def retarget(self, peer: int, channel: int, body: memoryview) -> bool:
        """Land the rest of the next message to deliver from ``peer`` on ``channel`` in ``body``
        (see :meth:`~.receiving.Inbox.retarget`); the buffer its allocation returned is then no
        longer written.  False if there is no such message in progress of ``body``'s size."""
        session = self._sessions.get(peer)
        return session is not None and session.inbox.retarget(channel, body)

    # -- datagrams in -----------------------------------------------------------------------------

    def receive(
        self,
        data: bytes | bytearray | memoryview,
        addr: Address,
        now: float,
        segment_size: int | None = None,
    ) -> None:
        """One datagram, or a GRO batch of ``segment_size``-byte datagrams; never raises.

        Keeps no reference to ``data`` once it returns (what it keeps, it copies), so a driver
        may read every datagram into one reused buffer."""
        self._now = now if now > self._now else self._now  # _tick, inlined
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        if segment_size is None or segment_size <= 0 or segment_size >= n:
            self._datagram(view, addr, now, n)
            return
        if self._batch(view, segment_size, addr, now):
            return
        for at in range(0, n, segment_size):
            datagram = view[at : at + segment_size]
            self._datagram(datagram, addr, now, len(datagram))

    def _batch(self, view: memoryview, segment_size: int, addr: Address, now: float) -> bool:
        """A GRO batch of consecutive segments of one frame, taken in one pass (True), else
        False and nothing done: the caller takes it datagram by datagram."""
        try:
            header = parse_header(view)
        except HeaderError:
            return False
        if header.type != PacketType.SEGMENT or header.cluster_tag != self._tag:
            return False
        session = self._by_id.get(header.session_id)
        if session is None or not session.on_batch(header, view, segment_size, addr, now):
            return False
        counters = self._counters
        counters["datagrams_in"] += -(-len(view) // segment_size)
        counters["bytes_in"] += len(view)
        return True

    def _datagram(self, view: memoryview, addr: Address, now: float, n: int) -> None:
        """One datagram of ``n`` bytes."""
        counters = self._counters
        counters["datagrams_in"] += 1
        counters["bytes_in"] += n
        try:
            header = parse_header(view)
        except HeaderError:
            counters["dropped_malformed"] += 1
            return
        if header.cluster_tag != self._tag:
            counters["dropped_wrong_cluster"] += 1
            return
        if header.type == _SEGMENT:
            session = self._by_id.get(header.session_id)
            if session is None:
                counters["dropped_unknown_session"] += 1
                return
            session.on_segment(header, view[HEADER_SIZE:], addr, now)
        elif header.type == PacketType.HELLO:
            self._on_hello(header, view, addr, now)
        else:
            self._on_hello_ack(header, view, addr, now)

    def _foreign(self, msg: pb.Hello | pb.HelloAck, from_rank_ok: bool) -> bool:
        return (
            msg.cluster_tag != self._tag_int
            or msg.to_rank != self.rank
            or not from_rank_ok
            or msg.comm_id != self.comm_id
            or msg.epoch != self.epoch
        )

    def _on_hello(self, header: Header, view: memoryview, addr: Address, now: float) -> None:
        counters = self._counters
        msg = handshake.open_body(self._key, view, header) if header.session_id == 0 else None
        if msg is None or len(msg.client_nonce) != NONCE_SIZE or msg.client_session_id == 0:
            counters["dropped_auth"] += 1
            return
        if self._foreign(msg, 0 <= msg.from_rank < self.rank):
            counters["dropped_foreign"] += 1
            return
        if self._closed:
            return
        session = self._sessions.get(msg.from_rank)
        if session is not None and session.client_nonce == msg.client_nonce:
            session.hello_ack_due = session.hello_ack is not None  # our answer was lost
            return
        if session is not None and (session.confirmed or not allowed(session.state, Input.HELLO)):
            counters["dropped_replay"] += 1  # a stale HELLO: the live session stays
            return
        if not self._guard.accept(msg.client_nonce, msg.timestamp, self._wall()):
            counters["dropped_replay"] += 1
            return
        if session is None:  # the peer was not declared yet: its HELLO declares it
            session = self._new_session(msg.from_rank, False, addr, now)
            session.fire(Input.AWAIT)
        else:  # fresh keys, fresh id: nothing of an unconfirmed attempt stays valid
            del self._by_id[session.local_id]
            session.local_id = self._new_session_id()
            self._by_id[session.local_id] = session
        server_nonce = self._random(NONCE_SIZE)
        c2s, s2c = session_ciphers(
            self._key, msg.client_nonce, server_nonce, self.comm_id, self.epoch
        )
        session.client_nonce = msg.client_nonce
        session.addr = addr
        session.establish(s2c, c2s, msg.client_session_id, msg.window_bytes, now)
        answer = pb.HelloAck(
            cluster_tag=self._tag_int,
            from_rank=self.rank,
            to_rank=msg.from_rank,
            comm_id=self.comm_id,
            epoch=self.epoch,
            client_nonce=msg.client_nonce,
            server_nonce=server_nonce,
            server_session_id=session.local_id,
            window_bytes=self.config.window_bytes,
        )
        session.hello_ack = handshake.build(
            self._key, self._tag, PacketType.HELLO_ACK, msg.client_session_id, answer
        )
        session.hello_ack_due = True
        first = session.state is State.WAITING
        session.fire(Input.HELLO)
        counters["handshakes"] += 1
        if first:
            self._events.append(PeerConnected(session.peer, addr))

    def _on_hello_ack(self, header: Header, view: memoryview, addr: Address, now: float) -> None:
        counters = self._counters
        session = self._by_id.get(header.session_id)
        if session is None or not session.is_client:
            counters["dropped_unknown_session"] += 1
            return
        msg = handshake.open_body(self._key, view, header)
        if msg is None or len(msg.server_nonce) != NONCE_SIZE or msg.server_session_id == 0:
            counters["dropped_auth"] += 1
            return
        if self._foreign(msg, msg.from_rank == session.peer) or (
            msg.client_nonce != session.client_nonce
        ):
            counters["dropped_foreign"] += 1
            return
        if not allowed(session.state, Input.HELLO_ACK):
            counters["dropped_duplicate"] += 1
            return
        c2s, s2c = session_ciphers(
            self._key, session.client_nonce, msg.server_nonce, self.comm_id, self.epoch
        )
        session.establish(c2s, s2c, msg.server_session_id, msg.window_bytes, now)
        session.addr = addr
        session.fire(Input.HELLO_ACK)
        counters["handshakes"] += 1
        self._events.append(PeerConnected(session.peer, addr))

    # -- outputs ----------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Batch]:
        """``(addr, payload, segment_size)`` batches that congestion control and pacing allow."""
        self._now = now if now > self._now else self._now  # _tick, inlined
        out: list[Batch] = []
        for session in self._sessions.values():
            session.produce(now, out)
        return out

    def get_timer(self) -> float | None:
        """Absolute time of the next :meth:`handle_timer` call, or None."""
        best: float | None = None
        for session in self._sessions.values():
            t = session.timer()
            if t is not None and (best is None or t < best):
                best = t
        if best is None:
            return None
        # A deadline that passed while we handled a datagram is due now, not in the past.
        now = self._now
        return best if best > now else now

    def handle_timer(self, now: float) -> None:
        self._tick(now)
        for session in list(self._sessions.values()):
            session.on_timer(now)

    def _tick(self, now: float) -> None:
        # A compare, not max(): a builtin call costs more, on every input.
        self._now = now if now > self._now else self._now

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def request_acks(self, now: float) -> None:
        """Ask every peer that holds unacknowledged frames of ours to acknowledge them at once
        (a PING with the next datagrams).  Small frames are acknowledged up to
        ``config.max_ack_delay`` late otherwise; a driver about to close, which waits for every
        ``MessageSent``, calls this first."""
        self._tick(now)
        for session in self._sessions.values():
            session.request_ack()

    def close(self, now: float) -> None:
        """CLOSE to every peer (with the next datagrams); later sends raise."""
        self._shut(ChunkKind.CLOSE, "")

    def abort(self, reason: str, now: float) -> None:
        """ABORT to every peer, then closed."""
        self._shut(ChunkKind.ABORT, reason)

    def _shut(self, kind: ChunkKind, reason: str) -> None:
        self._closed = True
        for session in self._sessions.values():
            session.close(kind, reason)

    def stats(self) -> dict[str, int]:
        """The counters of docs/udp-transport.md ("Counters"), plus packets in flight."""
        out = dict(self._counters)
        out["sessions"] = sum(s.state is State.ESTABLISHED for s in self._sessions.values())
        # Gauges of the worst peer: its RTT estimate (us, what its probe timeout is made of) and
        # the largest congestion window (bytes).
        recs = [s.out.recovery for s in self._sessions.values() if s.out is not None]
        out["srtt_us_max"] = int(max((r.rtt.smoothed for r in recs), default=0.0) * 1e6)
        out["rttvar_us_max"] = int(max((r.rtt.rttvar for r in recs), default=0.0) * 1e6)
        out["cwnd_max"] = max((r.cwnd for r in recs), default=0)
        return out
