"""The few HTTP calls every client of a ComfyUI server here makes (standard library only).

Shared by the end-to-end tests' client and the end-to-end benchmark's client: JSON requests
that bypass any ``http_proxy``, HTTP errors as :class:`ComfyError` with the server's reason, and
the rule that turns a ``/history`` entry into success or an error naming what failed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

# Requests go straight to the server, whatever http_proxy says.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyError(RuntimeError):
    """The server refused a request or a prompt, or running it failed; the message holds
    ComfyUI's reason."""


class ComfyHTTP:
    """JSON over HTTP to one ComfyUI server."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def request(self, path: str, body: Any = None, timeout: float | None = None) -> bytes:
        """GET ``path`` (POST ``body`` as JSON when given); raises ComfyError on HTTP errors."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with OPENER.open(req, timeout=self.timeout if timeout is None else timeout) as resp:
                payload: bytes = resp.read()
                return payload
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ComfyError(f"{req.get_method()} {path}: HTTP {exc.code}: {detail}") from None

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        return json.loads(self.request(path, timeout=timeout))


def check_finished(prompt_id: str, entry: dict[str, Any]) -> None:
    """Raise ComfyError unless a prompt's ``/history`` entry says it completed successfully."""
    status = entry.get("status") or {}
    if status.get("status_str") != "success" or not status.get("completed", False):
        errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
        raise ComfyError(f"prompt {prompt_id} failed: {json.dumps(errors or status)[:2000]}")


__all__ = ["OPENER", "ComfyError", "ComfyHTTP", "check_finished"]
