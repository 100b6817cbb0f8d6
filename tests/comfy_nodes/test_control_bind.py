"""The control endpoint listens only on an address the user gave (never the wildcard unasked)."""

from __future__ import annotations

import pytest

from comfy_nodes.server.integration import _bind_host


def test_listen_address_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFY_CLUSTER_LISTEN_ADDRESS", "127.0.0.3")
    assert _bind_host("127.0.0.1", "0.0.0.0") == "127.0.0.3"


def test_advertised_host_of_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFY_CLUSTER_LISTEN_ADDRESS", raising=False)
    assert _bind_host("127.0.0.2", "127.0.0.1") == "127.0.0.2"


def test_unbindable_advertised_host_falls_back_to_comfyuis_listen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COMFY_CLUSTER_LISTEN_ADDRESS", raising=False)
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine (a NAT's public side, say)
    assert _bind_host("192.0.2.7", "127.0.0.1,::1") == "127.0.0.1"
    assert _bind_host("192.0.2.7", None) == "127.0.0.1"
