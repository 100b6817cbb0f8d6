"""The cluster key the launcher hands its ranks: made up when none is set, never printed, and a
multi-node launch on a non-loopback master refused without one."""

from __future__ import annotations

import hashlib
import io
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import comfyui_cluster.launchers.comfyui_start as comfyui_start
from collectives.auth import ClusterKey
from collectives.errors import ConfigurationError
from comfyui_cluster.launchers import LaunchConfig, launch
from comfyui_cluster.launchers.comfyui import ComfyClusterConfig, main
from comfyui_cluster.launchers.config import with_cluster_key

KNOWN = "launcher-made-key-0123456789abcdef"
PRINT_KEY_HASH = textwrap.dedent(
    """
    import hashlib, os
    key = os.environ.get("COMFY_CLUSTER_KEY", "")
    print(hashlib.sha256(key.encode()).hexdigest(), os.environ.get("COMFY_CLUSTER_KEY_FILE"))
    """
)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(autouse=True)
def _no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COMFY_CLUSTER_KEY", "COMFY_CLUSTER_KEY_FILE", "COMFY_CLUSTER_INSECURE"):
        monkeypatch.delenv(name, raising=False)


def _launch(config: LaunchConfig) -> list[str]:
    out = io.StringIO()
    assert launch(config, stdout=out) == 0, out.getvalue()
    return out.getvalue().splitlines()


def test_ranks_share_a_made_up_key_only_when_none_is_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ClusterKey, "generate", classmethod(lambda cls: cls(KNOWN)))
    lines = _launch(LaunchConfig(nproc=2, command=[sys.executable, "-c", PRINT_KEY_HASH]))
    assert sorted(lines) == [f"[rank {r}] {_digest(KNOWN)} None" for r in (0, 1)]
    assert not any(KNOWN in line for line in lines)
    # A key in the environment is inherited as it is, never replaced.
    mine = "users-own-cluster-key-0123456789"
    lines = _launch(
        LaunchConfig(
            nproc=1, command=[sys.executable, "-c", PRINT_KEY_HASH], env={"COMFY_CLUSTER_KEY": mine}
        )
    )
    assert lines == [f"[rank 0] {_digest(mine)} None"]
    key_file = tmp_path / "key"
    key_file.write_text(mine)
    config = LaunchConfig(
        nproc=1,
        command=[sys.executable, "-c", PRINT_KEY_HASH],
        env={"COMFY_CLUSTER_KEY_FILE": str(key_file)},
    )
    assert _launch(config) == [f"[rank 0] {_digest('')} {key_file}"]


def test_the_key_never_shows_in_repr() -> None:
    config = with_cluster_key(LaunchConfig(nproc=2, command=["true"]))
    assert config.cluster_key is not None
    assert config.cluster_key not in repr(config)


def _multi_node(**kw: Any) -> LaunchConfig:
    return LaunchConfig(
        nproc=1, command=["true"], rank_offset=1, world_size=2, master_port=29500, **kw
    )


def test_multi_node_on_a_non_loopback_master_needs_a_shared_key() -> None:
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_KEY") as info:
        _multi_node(master_addr="192.0.2.1").validate()
    assert "\n" not in str(info.value)
    _multi_node(master_addr="192.0.2.1", env={"COMFY_CLUSTER_KEY": KNOWN}).validate()
    _multi_node(master_addr="192.0.2.1", env={"COMFY_CLUSTER_INSECURE": "1"}).validate()
    # Every launcher would invent a different key: a multi-node launch never makes one up.
    loopback = _multi_node(master_addr="127.0.0.1")
    loopback.validate()
    assert with_cluster_key(loopback).cluster_key is None


def test_comfyui_multi_node_without_key_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    config = ComfyClusterConfig(
        nproc=1, rank_offset=1, world_size=2, master_addr="192.0.2.1", master_port=29500
    )
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_KEY"):
        config.validate()
    argv = ["--nproc", "1", "--node-rank-offset", "1", "--world-size", "2",
            "--master-addr", "192.0.2.1", "--master-port", "29500"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "COMFY_CLUSTER_KEY" in err


def test_comfyui_ranks_get_one_key_for_start_and_restart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ClusterKey, "generate", classmethod(lambda cls: cls(KNOWN)))
    started: list[LaunchConfig] = []

    def fake_start(config: LaunchConfig, **kw: Any) -> object:
        started.append(config)
        return object()

    monkeypatch.setattr(comfyui_start, "start", fake_start)
    cluster = comfyui_start._start(
        ComfyClusterConfig(nproc=2, base_directory=str(tmp_path)),
        python=sys.executable,
        base=tmp_path,
        temporary=False,
        gpu_ids=[],
        master_port=29500,
        stdout=io.StringIO(),
        stderr=None,
    )
    assert started[0].cluster_key == KNOWN
    assert [rank.env["COMFY_CLUSTER_KEY"] for rank in cluster._ranks.values()] == [KNOWN, KNOWN]
    assert [rank.env["MASTER_ADDR"] for rank in cluster._ranks.values()] == ["127.0.0.1"] * 2


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_a_blank_key_in_the_environment_counts_as_none(blank: str) -> None:
    from comfyui_cluster.launchers import child_env

    config = with_cluster_key(LaunchConfig(nproc=1, command=["true"]), {"COMFY_CLUSTER_KEY": blank})
    assert config.cluster_key is not None  # made up here...
    env = child_env(config, config.slots()[0], 29500, base={"COMFY_CLUSTER_KEY": blank})
    assert env["COMFY_CLUSTER_KEY"] == config.cluster_key  # ...and handed to the rank


@pytest.mark.parametrize(
    ("nproc", "offset", "world", "expected"),
    [(2, 0, None, False), (2, 0, 2, False), (2, 0, 4, True), (2, 2, 4, True), (2, 2, None, True)],
)
def test_launch_and_comfyui_configs_agree_on_multi_node(
    nproc: int, offset: int, world: int | None, expected: bool
) -> None:
    from comfyui_cluster.launchers.config import is_multi_node

    config = LaunchConfig(nproc=nproc, command=["true"], rank_offset=offset, world_size=world)
    assert config.multi_node is is_multi_node(nproc, offset, world) is expected
