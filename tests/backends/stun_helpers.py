"""Shared parts of the tests/backends/test_udp_stun_*.py tests: the environment of a rank in
``stun`` discovery (worlds of ranks: tests/backends/udp_worlds.py)."""

from __future__ import annotations

import os

KEY = "udp-stun-test-key-0123456789abcdef"


def stun_env(url: str, cluster: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "COMFY_CLUSTER_BACKEND": "udp",
        "COMFY_CLUSTER_REGISTRATION_MODE": "stun",
        "COMFY_CLUSTER_STUN_SERVER": url,
        "COMFY_CLUSTER_CLUSTER_ID": cluster,
        "COMFY_CLUSTER_KEY": KEY,
        "COMFY_CLUSTER_LISTEN_ADDRESS": "127.0.0.1",
        **extra,
    }
