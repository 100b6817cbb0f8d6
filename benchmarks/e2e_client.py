"""The end-to-end benchmark's view of a ComfyUI server: HTTP for prompts, a websocket for timing.

Standard library only (the dev venv has no aiohttp).  A prompt's wall time runs from just before
``POST /prompt`` to the websocket message ComfyUI sends right after it wrote the prompt's history
entry (``executing`` with ``node: null``): the moment ``/history/<id>`` would first answer, with
no polling interval in the measurement and no polling load on the server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from comfyui_cluster.launchers.comfyui_http import ComfyError, ComfyHTTP, check_finished

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


ComfyRunError = ComfyError  # the name this module has always raised


@dataclass(frozen=True)
class Timed:
    """One prompt's timing."""

    prompt_id: str
    wall_s: float  # POST /prompt sent -> history written (client clock)
    queued_s: float  # POST /prompt sent -> its answer received
    server_s: float | None  # execution_start -> execution_success (server clock, ms resolution)


class _WebSocket:
    """The client end of one RFC 6455 websocket: enough to read ComfyUI's JSON messages."""

    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._sock.sendall(request.encode())
        self._buf = b""
        head = self._read_until(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self.close()
            raise ConnectionError(f"websocket upgrade refused: {status.decode(errors='replace')}")

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed during the handshake")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _read_exact(self, count: int) -> bytes:
        while len(self._buf) < count:
            chunk = self._sock.recv(max(65536, count - len(self._buf)))
            if not chunk:
                raise ConnectionError("websocket closed by the server")
            self._buf += chunk
        data, self._buf = self._buf[:count], self._buf[count:]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        # Client frames are masked (RFC 6455 5.3); control payloads here are short.
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        header = bytes([0x80 | opcode])
        size = len(payload)
        if size < 126:
            header += bytes([0x80 | size])
        elif size < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", size)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", size)
        self._sock.sendall(header + mask + masked)

    def receive(self, timeout: float) -> tuple[int, bytes]:
        """The next whole message (opcode, payload); answers pings on the way."""
        self._sock.settimeout(timeout)
        opcode: int | None = None
        parts: list[bytes] = []
        while True:
            first, second = self._read_exact(2)
            fin, op = first & 0x80, first & 0x0F
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", self._read_exact(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", self._read_exact(8))
            mask = self._read_exact(4) if second & 0x80 else b""
            payload = self._read_exact(size)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if op == _OP_PING:
                self._send(_OP_PONG, payload)
                continue
            if op == _OP_PONG:
                continue
            if op == _OP_CLOSE:
                raise ConnectionError("websocket closed by the server")
            if op != _OP_CONT:
                opcode, parts = op, []
            parts.append(payload)
            if fin and opcode is not None:
                return opcode, b"".join(parts)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(_OP_CLOSE, struct.pack("!H", 1000))
        self._sock.close()


class BenchClient(ComfyHTTP):
    """Queue prompts on one ComfyUI server and time them to the millisecond and below."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        super().__init__(url, timeout)
        self.client_id = uuid.uuid4().hex
        self._ws: _WebSocket | None = None

    # --- cluster state -------------------------------------------------------------------------

    def cluster_status(self) -> dict[str, Any]:
        """``GET /cluster/status``; ``{}`` while the server does not answer."""
        try:
            status: dict[str, Any] = self.get_json("/cluster/status", timeout=5.0)
        except (ComfyRunError, OSError, ValueError):
            return {}
        return status

    def wait_cluster_ready(self, timeout: float) -> dict[str, Any]:
        """Block until ``/cluster/status`` says ``ready`` (``single`` for one instance)."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.cluster_status()
            if status.get("state") in ("ready", "single"):
                return status
            time.sleep(0.25)
        raise TimeoutError(f"cluster not ready after {timeout:g} s: /cluster/status = {status}")

    # --- timed prompts -------------------------------------------------------------------------

    def connect(self) -> None:
        if self._ws is not None:
            return
        parts = urllib.parse.urlsplit(self.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        self._ws = _WebSocket(host, port, f"/ws?clientId={self.client_id}", self.timeout)

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def run(self, prompt: Mapping[str, Any], timeout: float) -> Timed:
        """Queue ``prompt`` and wait until its history entry exists; raises if it failed."""
        self.connect()
        assert self._ws is not None
        body = {"prompt": prompt, "client_id": self.client_id}
        began = time.perf_counter()
        answer = json.loads(self.request("/prompt", body))
        queued = time.perf_counter() - began
        if answer.get("node_errors") or "prompt_id" not in answer:
            raise ComfyRunError(f"prompt rejected: {json.dumps(answer)[:2000]}")
        prompt_id: str = answer["prompt_id"]
        deadline = began + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:g} s")
            opcode, payload = self._ws.receive(left)
            if opcode != _OP_TEXT:
                continue  # previews and other binary messages
            message = json.loads(payload)
            data = message.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            kind = message.get("type")
            if kind == "executing" and data.get("node") is None:
                wall = time.perf_counter() - began
                break
            if kind in ("execution_error", "execution_interrupted"):
                wall = time.perf_counter() - began
                break
        entry = self.get_json(f"/history/{prompt_id}").get(prompt_id) or {}
        check_finished(prompt_id, entry)
        messages = (entry.get("status") or {}).get("messages", [])
        return Timed(prompt_id, wall, queued, _server_seconds(messages))


def _server_seconds(messages: list[Any]) -> float | None:
    """execution_start -> execution_success from the history's messages (ms timestamps)."""
    stamps: dict[str, float] = {}
    for item in messages:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict):
            stamp = item[1].get("timestamp")
            if isinstance(stamp, (int, float)):
                stamps[str(item[0])] = float(stamp)
    if "execution_start" in stamps and "execution_success" in stamps:
        return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
    return None


__all__ = ["BenchClient", "ComfyRunError", "Timed"]
