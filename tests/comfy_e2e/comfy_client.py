"""A small, typed client for a ComfyUI server's HTTP API (standard library only).

Enough for tests: ``/system_stats``, ``/object_info``, queue a prompt (``POST /prompt``), wait for
it by polling ``/history/<id>`` (no websocket: the dev venv has no aiohttp, and polling a test's
few prompts costs nothing), and fetch outputs through ``/view``.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

from comfyui_cluster.launchers.comfyui_http import ComfyError, ComfyHTTP, check_finished

Prompt = Mapping[str, Mapping[str, Any]]
"""An API-format workflow: node id -> {"class_type": ..., "inputs": {...}}."""


class ComfyClient(ComfyHTTP):
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        super().__init__(url, timeout)
        self.client_id = uuid.uuid4().hex

    def is_up(self) -> bool:
        """Whether ``/system_stats`` answers now."""
        try:
            self.request("/system_stats", timeout=2.0)
        except (OSError, ComfyError):
            return False
        return True

    def system_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.get_json("/system_stats")
        return stats

    def object_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.get_json("/object_info")
        return info

    # --- prompts ---------------------------------------------------------------------------

    def queue_prompt(self, prompt: Prompt) -> str:
        """Queue ``prompt``; returns its id.  A validation failure raises with ComfyUI's errors."""
        body = {"prompt": prompt, "client_id": self.client_id}
        answer = json.loads(self.request("/prompt", body))
        if answer.get("node_errors"):
            raise ComfyError(f"prompt rejected: {json.dumps(answer['node_errors'])[:2000]}")
        prompt_id: str = answer["prompt_id"]
        return prompt_id

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry once it finished (successfully or not), else None."""
        entries: dict[str, Any] = self.get_json(f"/history/{prompt_id}")
        entry: dict[str, Any] | None = entries.get(prompt_id)
        return entry

    def wait(self, prompt_id: str, timeout: float = 300.0, interval: float = 0.1) -> dict[str, Any]:
        """Poll until the prompt finished; returns its history entry, ComfyError if it failed."""
        deadline = time.monotonic() + timeout
        while (entry := self.history(prompt_id)) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:g} s")
            time.sleep(interval)
        check_finished(prompt_id, entry)
        return entry

    def run(self, prompt: Prompt, timeout: float = 300.0) -> dict[str, Any]:
        """Queue ``prompt``, wait for it, return its outputs (node id -> UI output)."""
        outputs: dict[str, Any] = self.wait(self.queue_prompt(prompt), timeout)["outputs"]
        return outputs

    # --- outputs ---------------------------------------------------------------------------

    def view(self, ref: Mapping[str, str]) -> bytes:
        """A file a node output refers to (``{"filename", "subfolder", "type"}``)."""
        query = urllib.parse.urlencode(
            {k: ref.get(k, "") for k in ("filename", "subfolder", "type")}
        )
        return self.request(f"/view?{query}")

    def images(self, outputs: Mapping[str, Any], node_id: str) -> list[bytes]:
        """The files of every image node ``node_id`` (a SaveImage, say) produced, in order."""
        return [self.view(ref) for ref in outputs[node_id]["images"]]


__all__ = ["ComfyClient", "ComfyError", "Prompt"]
