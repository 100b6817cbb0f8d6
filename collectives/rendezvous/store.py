"""The rendezvous store: a small key-value server on rank 0 that only the cluster key opens.

It replaces torch's ``TCPStore``, which listens on every interface and serves anyone: there a
process without the key could read the check-ins, claim a rank before the real one, write
addresses for gloo to connect to, or stall the world.  Here:

* :class:`StoreServer` listens on exactly the address it is given (``MASTER_ADDR``), never the
  wildcard, and serves a connection only after the challenge-response handshake of
  :mod:`collectives.rendezvous.store_wire` (both sides prove the key; every later frame carries a
  MAC).  A connection that fails it is logged, answered with a refusal and dropped; a malformed,
  oversized or half-open connection costs the server one thread for at most
  ``handshake_timeout_s`` and never takes it down.  Keys, value sizes and total bytes are bounded.
* :class:`StoreClient` is the other end: a blocking client whose handshake also tells it that
  the server holds the key (so it is the genuine rank 0), raising
  :class:`~collectives.errors.AuthenticationError` otherwise.
  :mod:`collectives.rendezvous.torch_store` wraps it as a ``torch.distributed.Store``.

Without a cluster key (``key=None``) both sides run the same protocol with a key everyone knows
(:data:`~collectives.rendezvous.store_wire.INSECURE_KEY`): that authenticates nothing, and callers
allow it only where :func:`collectives.auth.require_key` does (loopback, or
``COMFY_CLUSTER_INSECURE=1``).  A keyed client and a keyless server (or the reverse) refuse each
other.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import secrets
import socket
import threading
import time
from collections.abc import Sequence

from collectives.auth import ClusterKey
from collectives.errors import (
    AuthenticationError,
    CollectivesError,
    ConfigurationError,
    RemoteProtocolError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
)
from collectives.rendezvous import store_wire as wire
from collectives.rendezvous.store_wire import Op, Request, Status

log = logging.getLogger(__name__)

_MAX_WAIT_MS = 24 * 3600 * 1000
_CALL_TIMEOUT_S = 120.0  # any request but WAIT is answered at once by a live server


Address = tuple[int, tuple[object, ...]]  # (family, sockaddr), as resolve() returns it


def resolve(
    host: str,
    port: int,
    what: str = "MASTER_ADDR",
    fix: str = "set it to rank 0's address or a host name every rank can resolve",
) -> Address:
    """``(family, sockaddr)`` of ``host``; a :class:`ConfigurationError` naming ``what``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigurationError(f"{what}={host!r} does not resolve ({reason}): {fix}") from None
    family, _, _, _, sockaddr = infos[0]
    return int(family), tuple(sockaddr)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionResetError("connection closed by the peer")
        chunks += chunk
    return bytes(chunks)


def _connect_to(address: Address, timeout_s: float) -> socket.socket:
    """A TCP connection to an already resolved ``(family, sockaddr)``."""
    family, sockaddr = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


class _Table:
    """The key-value data, with the bounds and the blocking wait."""

    def __init__(self, max_keys: int, max_bytes: int) -> None:
        self._data: dict[str, bytes] = {}
        self._bytes = 0
        self._max_keys = max_keys
        self._max_bytes = max_bytes
        self._changed = threading.Condition()

    def _put(self, key: str, value: bytes) -> None:
        old = self._data.get(key)
        grown = len(key) + len(value) - (0 if old is None else len(key) + len(old))
        if old is None and len(self._data) >= self._max_keys:
            raise RemoteProtocolError(f"store full ({self._max_keys} keys)")
        if self._bytes + grown > self._max_bytes:
            raise RemoteProtocolError(f"store full ({self._max_bytes} bytes)")
        self._data[key] = value
        self._bytes += grown
        self._changed.notify_all()

    def _delete(self, key: str) -> bool:
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= len(key) + len(old)
        return old is not None

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix``; how many there were."""
        with self._changed:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for k in doomed:
                self._delete(k)
            return len(doomed)

    def handle(self, req: Request) -> bytes:
        with self._changed:
            key = req.keys[0] if req.keys else ""
            if req.op is Op.SET:
                self._put(key, req.values[0])
                return wire.pack_fields(Status.OK)
            if req.op is Op.GET:
                if key not in self._data:
                    return wire.pack_fields(Status.MISSING)
                return wire.pack_fields(Status.OK, self._data[key])
            if req.op is Op.ADD:
                raw = self._data.get(key, b"0")
                try:
                    total = int(raw) + req.amount
                except ValueError:
                    raise RemoteProtocolError(
                        f"store ADD on a key that is not a number: {key!r}"
                    ) from None
                self._put(key, str(total).encode("ascii"))
                return wire.pack_fields(Status.OK, wire.encode_i64(total))
            if req.op is Op.CHECK:
                found = all(k in self._data for k in req.keys)
                return wire.pack_fields(Status.OK, b"\x01" if found else b"\x00")
            if req.op is Op.WAIT:
                limit = time.monotonic() + min(req.timeout_ms, _MAX_WAIT_MS) / 1000
                while not all(k in self._data for k in req.keys):
                    left = limit - time.monotonic()
                    if left <= 0:
                        return wire.pack_fields(Status.TIMEOUT)
                    self._changed.wait(left)
                return wire.pack_fields(Status.OK)
            if req.op is Op.COMPARE_SET:
                expected, desired = req.values
                current = self._data.get(key)
                # TCPStore's rule: a missing key counts as equal to an empty expected value.
                if (current is None and expected == b"") or current == expected:
                    self._put(key, desired)
                    return wire.pack_fields(Status.OK, desired)
                return wire.pack_fields(Status.OK, expected if current is None else current)
            if req.op is Op.DELETE:
                found = self._delete(key)
                return wire.pack_fields(Status.OK, b"\x01" if found else b"\x00")
            assert req.op is Op.NUM_KEYS
            return wire.pack_fields(Status.OK, wire.encode_i64(len(self._data)))


class StoreServer:
    """Serves the rendezvous store on ``host:port`` (exactly that address) until :meth:`close`.

    ``port=0`` picks a free port (see :attr:`port`).  Raises :class:`ConfigurationError` when
    ``host`` does not resolve or the port is taken.
    """

    def __init__(
        self,
        host: str,
        port: int,
        key: ClusterKey | None,
        *,
        max_keys: int = 100_000,
        max_bytes: int = 64 << 20,
        max_pending: int = 64,
        max_connections: int = 4096,
        handshake_timeout_s: float = 5.0,
        address: Address | None = None,
    ) -> None:
        self.host = host
        self._key = wire.INSECURE_KEY if key is None else key
        self._table = _Table(max_keys, max_bytes)
        self._max_pending = max_pending
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout_s
        self._lock = threading.Lock()
        self._pending = 0
        self._conns: set[socket.socket] = set()
        self._closed = False
        family, sockaddr = resolve(host, port) if address is None else address
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # A restarted rank 0 must get its port back while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(128)
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                raise ConfigurationError(
                    f"MASTER_PORT={port} is already in use on {host}: pick a free port "
                    "(or launch with comfycluster-launch, which picks one)"
                ) from None
            raise ConfigurationError(
                f"rank 0 cannot listen on MASTER_ADDR:MASTER_PORT={host}:{port} "
                f"({err.strerror or err}): MASTER_ADDR must be an address of rank 0's host"
            ) from None
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"collectives-store-{self.port}", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)  # EMFILE and friends: back off rather than spin
                continue
            with self._lock:
                refuse = (
                    self._closed
                    or self._pending >= self._max_pending
                    or len(self._conns) >= self._max_connections
                )
                if not refuse:
                    self._pending += 1
                    self._conns.add(conn)
            if refuse:
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn, peer), name="collectives-store-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        authenticated = False
        try:
            conn.settimeout(self._handshake_timeout)
            inbound, outbound = self._handshake(conn, peer)
            authenticated = True
            with self._lock:
                self._pending -= 1
            conn.settimeout(None)
            while True:
                header = conn.recv(4)
                if not header:
                    return  # an orderly close between requests
                header += _recv_exact(conn, 4 - len(header))
                length = wire.frame_length(header)
                payload = _recv_exact(conn, length)
                tag = _recv_exact(conn, wire.TAG_BYTES)
                request = Request.decode(inbound.open(payload, tag))
                try:
                    reply = self._table.handle(request)
                except RemoteProtocolError as err:
                    reply = wire.pack_fields(Status.ERROR, str(err).encode())
                conn.sendall(outbound.seal(reply))
        except AuthenticationError as err:
            log.warning("rendezvous store on %s refused %s: %s", self.host, peer, err)
        except (CollectivesError, OSError) as err:
            level = logging.DEBUG if authenticated else logging.INFO
            log.log(level, "rendezvous store on %s dropped %s: %s", self.host, peer, err)
        except Exception:  # a bug here must cost this connection, never the server
            log.exception("rendezvous store on %s: error serving %s", self.host, peer)
        finally:
            with self._lock:
                if not authenticated:
                    self._pending -= 1
                self._conns.discard(conn)
            conn.close()

    def _handshake(
        self, conn: socket.socket, peer: object
    ) -> tuple[wire.FrameSealer, wire.FrameSealer]:
        server_nonce = secrets.token_bytes(wire.NONCE_BYTES)
        conn.sendall(wire.hello(server_nonce))
        data = _recv_exact(conn, wire.PROOF_BYTES)
        try:
            client_nonce = wire.check_proof(self._key, server_nonce, data)
        except AuthenticationError:
            with contextlib.suppress(OSError):
                conn.sendall(wire.REFUSE)
            raise
        conn.sendall(wire.ACCEPT + wire.server_tag(self._key, server_nonce, client_nonce))
        session = wire.session_key(self._key, server_nonce, client_nonce)
        return wire.FrameSealer(session, b"c"), wire.FrameSealer(session, b"s")

    @property
    def connections(self) -> int:
        """How many connections are open now (in the handshake or authenticated)."""
        with self._lock:
            return len(self._conns)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix`` (in this process: no client needed)."""
        return self._table.delete_prefix(prefix)

    def close(self) -> None:
        """Stop listening and drop every connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreClient:
    """One authenticated connection to a :class:`StoreServer` (thread-safe, one call at a time).

    Raises :class:`AuthenticationError` when the server refuses this key or cannot prove that it
    holds it; :class:`RendezvousConnectionError` when the connection fails or is lost.
    """

    def __init__(
        self,
        host: str,
        port: int,
        key: ClusterKey | None,
        *,
        connect_timeout_s: float = 5.0,
        address: Address | None = None,
    ) -> None:
        self.where = f"{host}:{port}"
        self._key = wire.INSECURE_KEY if key is None else key
        self._lock = threading.Lock()
        try:
            if address is None:
                sock = socket.create_connection((host, port), timeout=connect_timeout_s)
            else:
                sock = _connect_to(address, connect_timeout_s)
        except OSError as err:
            raise RendezvousConnectionError(
                f"cannot reach the rendezvous store at {self.where}: {err.strerror or err}"
            ) from None
        try:
            self._outbound, self._inbound = self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        self._sock: socket.socket | None = sock

    def _handshake(self, sock: socket.socket) -> tuple[wire.FrameSealer, wire.FrameSealer]:
        try:
            server_nonce = wire.parse_hello(_recv_exact(sock, wire.HELLO_BYTES))
            client_nonce = secrets.token_bytes(wire.NONCE_BYTES)
            sock.sendall(wire.proof(self._key, server_nonce, client_nonce))
            verdict = _recv_exact(sock, len(wire.REFUSE))
            if verdict == wire.REFUSE:
                raise AuthenticationError(self._refused())
            answer = verdict + _recv_exact(sock, wire.ANSWER_BYTES - len(verdict))
        except OSError as err:
            raise RendezvousConnectionError(
                f"the rendezvous store at {self.where} dropped the handshake: {err}"
            ) from None
        expected = wire.server_tag(self._key, server_nonce, client_nonce)
        if answer[:2] != wire.ACCEPT or not hmac.compare_digest(answer[2:], expected):
            raise AuthenticationError(
                f"the rendezvous store at {self.where} could not prove it holds the cluster key: "
                "it is not this cluster's rank 0 (or the ranks' COMFY_CLUSTER_KEY differ)"
            )
        session = wire.session_key(self._key, server_nonce, client_nonce)
        return wire.FrameSealer(session, b"c"), wire.FrameSealer(session, b"s")

    def _refused(self) -> str:
        if self._key is wire.INSECURE_KEY:
            return (
                f"the rendezvous store at {self.where} requires the cluster key and this process "
                "has none: set COMFY_CLUSTER_KEY (the same on every rank)"
            )
        return (
            f"the rendezvous store at {self.where} refused this process's cluster key: every "
            "rank needs the same COMFY_CLUSTER_KEY"
        )

    def _call(self, request: Request, timeout_s: float | None = None) -> list[bytes]:
        with self._lock:
            sock = self._sock
            if sock is None:
                raise RendezvousConnectionError(f"the rendezvous store at {self.where} is closed")
            try:
                sock.settimeout(_CALL_TIMEOUT_S if timeout_s is None else timeout_s)
                sock.sendall(self._outbound.seal(request.encode()))
                length = wire.frame_length(_recv_exact(sock, 4))
                payload = _recv_exact(sock, length)
                reply = self._inbound.open(payload, _recv_exact(sock, wire.TAG_BYTES))
            except (OSError, CollectivesError) as err:
                self._sock = None
                sock.close()
                if isinstance(err, AuthenticationError):
                    raise
                raise RendezvousConnectionError(
                    f"lost the rendezvous store at {self.where} (did rank 0 exit?): {err}"
                ) from None
        status, fields = wire.unpack_fields(reply)
        if status == Status.ERROR:
            message = fields[0].decode("utf-8", "replace") if fields else "error"
            raise RemoteProtocolError(f"rendezvous store at {self.where}: {message}")
        if status == Status.TIMEOUT:
            raise RendezvousTimeoutError(f"timed out waiting for keys at {self.where}")
        if status == Status.MISSING:
            raise KeyError(request.keys[0])
        return fields

    def set(self, key: str, value: bytes) -> None:
        self._call(Request(Op.SET, (key,), (bytes(value),)))

    def get(self, key: str) -> bytes:
        """The value of ``key``; :class:`KeyError` if it is not set (see :meth:`wait`)."""
        return self._call(Request(Op.GET, (key,)))[0]

    def add(self, key: str, amount: int) -> int:
        return wire.decode_i64(self._call(Request(Op.ADD, (key,), amount=amount))[0])

    def check(self, keys: Sequence[str]) -> bool:
        return self._call(Request(Op.CHECK, tuple(keys)))[0] == b"\x01"

    def wait(self, keys: Sequence[str], timeout_s: float) -> None:
        """Until every key exists; :class:`RendezvousTimeoutError` after ``timeout_s``."""
        ms = max(int(timeout_s * 1000), 0)
        # The socket waits a little longer than the server, so the server's answer decides.
        self._call(Request(Op.WAIT, tuple(keys), timeout_ms=ms), timeout_s=timeout_s + 10.0)

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        return self._call(Request(Op.COMPARE_SET, (key,), (bytes(expected), bytes(desired))))[0]

    def delete_key(self, key: str) -> bool:
        return self._call(Request(Op.DELETE, (key,)))[0] == b"\x01"

    def num_keys(self) -> int:
        return wire.decode_i64(self._call(Request(Op.NUM_KEYS))[0])

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


__all__ = ["Address", "StoreClient", "StoreServer", "resolve"]
