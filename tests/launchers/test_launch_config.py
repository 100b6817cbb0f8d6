"""LaunchConfig.validate: each mistake is one line that says what to do."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator

import pytest

from collectives.errors import ConfigurationError
from comfyui_cluster.launchers import LaunchConfig, RankSlot, launch
from comfyui_cluster.launchers.config import pick_free_port, port_in_use


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _error(config: LaunchConfig) -> str:
    with pytest.raises(ConfigurationError) as info:
        config.validate()
    text = str(info.value)
    assert "\n" not in text
    return text


def test_port_in_use(listening: int) -> None:
    config = LaunchConfig(nproc=1, command=["true"], master_port=listening)
    assert _error(config) == (
        f"MASTER_PORT {listening} is in use on 127.0.0.1: pick another with --master-port "
        f"or leave it unset to choose a free one"
    )
    with pytest.raises(ConfigurationError, match="is in use"):
        launch(config)


def test_port_in_use_elsewhere_is_fine_on_a_follower_node(listening: int) -> None:
    # The master node's port is supposed to be taken: only rank 0's node checks it.
    LaunchConfig(
        nproc=1, command=["true"], master_port=listening, rank_offset=1, world_size=2
    ).validate()


def test_free_port_helpers(listening: int) -> None:
    assert port_in_use("127.0.0.1", listening)
    port = pick_free_port("127.0.0.1")
    assert 0 < port < 65536 and not port_in_use("127.0.0.1", port)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nproc": 0}, "--nproc 0 must be at least 1"),
        ({"command": []}, "no command given: put the program after '--'"),
        ({"command": [""]}, "no command given"),
        ({"command": "python x.py"}, "command 'python x.py' is a string: pass a list"),
        ({"rank_offset": -1}, "--node-rank-offset -1 is negative"),
        ({"rank_offset": 2}, "--node-rank-offset 2 needs --world-size"),
        ({"rank_offset": 2, "world_size": 3, "nproc": 2},
         "--node-rank-offset 2 + --nproc 2 exceeds --world-size 3: this node would run ranks 2..3 "
         "of 0..2"),
        ({"world_size": 1, "nproc": 2}, "exceeds --world-size 1"),
        ({"rank_offset": 1, "world_size": 2}, "--master-port is required"),
        ({"master_port": 0}, "--master-port 0 is out of range"),
        ({"master_port": 65536}, "--master-port 65536 is out of range"),
        ({"master_addr": ""}, "--master-addr is empty"),
        ({"master_addr": "no-such-host.invalid", "master_port": 1234}, "does not resolve"),
        ({"kill_grace_s": -1.0}, "--kill-grace -1.0 must be"),
        ({"timeout_s": 0.0}, "--timeout 0.0 must be a positive number of seconds"),
        ({"timeout_s": math.inf}, "--timeout inf must be"),
        ({"backend": " "}, "--backend is empty"),
        ({"env": {"A=B": "c"}}, "environment name 'A=B' is invalid"),
        ({"cwd": "/no/such/dir"}, "cwd '/no/such/dir' is not a directory"),
    ],
)  # fmt: skip
def test_bad_config(changes: dict[str, object], message: str) -> None:
    config = LaunchConfig(nproc=1, command=["true"])
    for name, value in changes.items():
        setattr(config, name, value)
    assert message in _error(config)


def test_slots_and_world_size() -> None:
    config = LaunchConfig(nproc=2, command=["x"], rank_offset=2, world_size=5, master_port=1)
    assert config.slots() == [RankSlot(2, 0, 5, 2), RankSlot(3, 1, 5, 2)]
    assert LaunchConfig(nproc=3, command=["x"]).total_world_size == 3
