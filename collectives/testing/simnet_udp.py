"""The driving API of :class:`~collectives.testing.simnet.SimNet` over real UDP sockets.

Why: to run the very scenario of a simulated test on real sockets (through a
:class:`~collectives.testing.lossy_relay.LossyRelay`, say) without the udp backend: one socket
per driven core on 127.0.0.1, one loop in the calling thread, the wall clock
(``time.monotonic``) as ``now``.  It is a test driver, not the backend: no GSO/GRO (a batch is
sent as its datagrams, one ``sendto`` each), no IO thread.  Like the backend's IO thread it waits
in ``select`` (microsecond timeouts; epoll and poll round a timeout up to a whole millisecond)
with fine timer slack: a pacing timer that fires ~0.5 ms late on average cost a paced flow ~8 %
of its rate at 100 Mbit/s (the pacer's bucket holds one frame, so time spent late is not
credited), which a benchmark would then blame on the transport::

    with SocketNet() as net:
        a_addr = net.add_node("a", endpoint_a)
        ...
        assert net.run_until(lambda: net.events_of("b", MessageReceived), timeout=10.0)
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, overload

from collectives.backends.udp_socket import fine_timer_slack
from collectives.testing.simnet import Address, Driven, Payload

E = TypeVar("E")
_SOCKET_BUFFER = 4 << 20
_RECV_BATCH = 64  # datagrams read per socket per turn, so one busy peer cannot starve the rest
_MAX_WAIT = 0.05  # s: the longest select, so run_until notices its predicate and deadline


class SocketNode:
    """A driven core with its socket and the events it emitted."""

    def __init__(self, name: str, endpoint: Driven, sock: socket.socket) -> None:
        self.name = name
        self.endpoint = endpoint
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.addr: Address = (host, port)
        self.events: list[object] = []
        self.on_event: list[Callable[[SocketNode, object], None]] = []
        self.send_failed = 0  # sendto refused by the kernel (buffer full): a local loss


class SocketNet:
    """Real-socket driver with SimNet's API; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.nodes: dict[str, SocketNode] = {}
        # select(2), not the default epoll: see the module docstring (a driver has few sockets)
        self._selector = selectors.SelectSelector()

    @property
    def now(self) -> float:
        return time.monotonic()

    def add_node(self, name: str, endpoint: Driven) -> Address:
        """Bind a socket for ``endpoint`` on an ephemeral port; returns its address."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} already exists")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        sock.bind((self.host, 0))
        sock.setblocking(False)
        node = SocketNode(name, endpoint, sock)
        self.nodes[name] = node
        self._selector.register(sock, selectors.EVENT_READ, node)
        return node.addr

    def address_of(self, name: str) -> Address:
        return self.nodes[name].addr

    def on_event(self, name: str, callback: Callable[[SocketNode, object], None]) -> None:
        self.nodes[name].on_event.append(callback)

    @overload
    def events_of(self, name: str) -> list[object]: ...

    @overload
    def events_of(self, name: str, kind: type[E]) -> list[E]: ...

    def events_of(self, name: str, kind: type[Any] | None = None) -> list[Any]:
        return [e for e in self.nodes[name].events if kind is None or isinstance(e, kind)]

    def wake(self, name: str | None = None) -> None:
        for node in self.nodes.values() if name is None else [self.nodes[name]]:
            self._after_interaction(node)

    def run_until(self, until: Callable[[], bool], *, timeout: float = 30.0) -> bool:
        """Drive every node until ``until()`` holds (True) or ``timeout`` wall seconds (False)."""
        fine_timer_slack()  # per thread, and this thread is the one that waits
        deadline = time.monotonic() + timeout
        self.wake()
        while not until():
            now = time.monotonic()
            if now >= deadline:
                return False
            self._fire_timers(now)
            if until():
                return True
            timer = self._next_timer()
            wait = min(_MAX_WAIT, deadline - now)
            if timer is not None:
                wait = min(wait, max(0.0, timer - time.monotonic()))
            for key, _ in self._selector.select(wait):
                node: SocketNode = key.data
                self._read(node)
        return True

    def close(self) -> None:
        self._selector.close()
        for node in self.nodes.values():
            node.sock.close()

    def __enter__(self) -> SocketNet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _next_timer(self) -> float | None:
        timers = [t for n in self.nodes.values() if (t := n.endpoint.get_timer()) is not None]
        return min(timers) if timers else None

    def _fire_timers(self, now: float) -> None:
        for node in self.nodes.values():
            timer = node.endpoint.get_timer()
            if timer is not None and timer <= now:
                node.endpoint.handle_timer(now)
                self._after_interaction(node)

    def _read(self, node: SocketNode) -> None:
        for _ in range(_RECV_BATCH):
            try:
                data, addr = node.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # an ICMP error from an earlier send surfaces here
                continue
            node.endpoint.receive(data, (addr[0], addr[1]), time.monotonic())
        self._after_interaction(node)

    def _after_interaction(self, node: SocketNode) -> None:
        for _ in range(2):  # a second round for what event callbacks queued
            while (event := node.endpoint.next_event()) is not None:
                node.events.append(event)
                for callback in node.on_event:
                    callback(node, event)
            for addr, payload, segment_size in node.endpoint.datagrams_to_send(time.monotonic()):
                self._send(node, addr, payload, segment_size)

    def _send(self, node: SocketNode, addr: Address, payload: Payload, segment_size: int) -> None:
        view = memoryview(payload).cast("B")
        for start in range(0, len(view), segment_size):
            try:
                node.sock.sendto(view[start : start + segment_size], addr)
            except (BlockingIOError, InterruptedError):
                node.send_failed += 1


__all__ = ["SocketNet", "SocketNode"]
