"""Reading the rank from each launcher's variables, their precedence, and the one-line errors."""

from __future__ import annotations

import pytest

from collectives.errors import ConfigurationError
from comfyui_cluster.launchers.env import RankEnv, detect_mpi_launcher, read_rank_env


def test_nothing_set_is_none() -> None:
    assert read_rank_env({}) is None
    assert read_rank_env({"MASTER_ADDR": "h", "PATH": "/bin"}) is None


def test_torchrun() -> None:
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500"}  # fmt: skip
    assert read_rank_env(env) == RankEnv(2, 4, 0, "10.0.0.1", 29500, "follower", "torchrun")


def test_rank0_is_leader_and_local_rank_defaults_to_rank() -> None:
    got = read_rank_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert got == RankEnv(0, 1, 0, None, None, "leader", "torchrun")
    got = read_rank_env({"RANK": "3", "WORLD_SIZE": "4"})
    assert got is not None and got.local_rank == 3


def test_comfy_cluster() -> None:
    env = {"COMFY_CLUSTER_INSTANCE_INDEX": "1", "COMFY_CLUSTER_INSTANCE_COUNT": "4",
           "COMFY_CLUSTER_ROLE": "FOLLOWER"}  # fmt: skip
    assert read_rank_env(env) == RankEnv(1, 4, 1, None, None, "follower", "comfy-cluster")
    env = {"COMFY_CLUSTER_INSTANCE_INDEX": "0", "COMFY_CLUSTER_INSTANCE_COUNT": "2",
           "COMFY_CLUSTER_ROLE": "leader"}  # fmt: skip
    got = read_rank_env(env)
    assert got is not None and got.role == "leader"
    got = read_rank_env({"COMFY_CLUSTER_INSTANCE_INDEX": "0", "COMFY_CLUSTER_INSTANCE_COUNT": "1"})
    assert got is not None and got.rank == 0


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
             "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
            (3, 8, 1, "openmpi"),
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, (1, 2, 1, "mpich")),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, 1, "mpich")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}, (5, 6, 2, "slurm")),
        # Inside srun the step's task count is the world, not the allocation's.
        (
            {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8"},
            (1, 2, 1, "slurm"),
        ),
    ],
)  # fmt: skip
def test_mpi_and_slurm(env: dict[str, str], expected: tuple[int, int, int, str]) -> None:
    got = read_rank_env(env)
    assert got is not None
    assert (got.rank, got.world_size, got.local_rank, got.source) == expected


def test_master_vars_ride_along_with_any_source() -> None:
    got = read_rank_env({"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert got is not None and (got.master_addr, got.master_port) == ("h", 1)


def test_precedence() -> None:
    everything = {
        "RANK": "1", "WORLD_SIZE": "2",
        "COMFY_CLUSTER_INSTANCE_INDEX": "2", "COMFY_CLUSTER_INSTANCE_COUNT": "3",
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
        "PMI_RANK": "4", "PMI_SIZE": "5",
        "SLURM_PROCID": "5", "SLURM_NTASKS": "6",
    }  # fmt: skip
    order = [
        ("RANK", "WORLD_SIZE"),
        ("COMFY_CLUSTER_INSTANCE_INDEX", "COMFY_CLUSTER_INSTANCE_COUNT"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ]
    sources = ["torchrun", "comfy-cluster", "openmpi", "mpich", "slurm"]
    env = dict(everything)
    for (rank_name, size_name), source in zip(order, sources, strict=True):
        got = read_rank_env(env)
        assert got is not None and got.source == source and got.rank == int(env[rank_name])
        del env[rank_name], env[size_name]
    assert read_rank_env(env) is None


def test_empty_values_count_as_unset() -> None:
    assert read_rank_env({"RANK": "", "WORLD_SIZE": " "}) is None
    got = read_rank_env({"RANK": "", "PMI_RANK": "0", "PMI_SIZE": "1", "MASTER_PORT": ""})
    assert got is not None and got.source == "mpich" and got.master_port is None


BAD = [
    ({"COMFY_CLUSTER_INSTANCE_INDEX": "4", "COMFY_CLUSTER_INSTANCE_COUNT": "4"},
     "COMFY_CLUSTER_INSTANCE_INDEX=4 is not < COMFY_CLUSTER_INSTANCE_COUNT=4: indices are 0-based; "
     "set it to 0..3"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is missing: set WORLD_SIZE to the number of ranks"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is missing"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 is negative"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not < WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not < WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is out of range: set it to a TCP port in 1..65535"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "0"}, "MASTER_PORT=0 is out of range"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"},
     "MASTER_PORT='http' is not an integer"),
    ({"COMFY_CLUSTER_INSTANCE_INDEX": "0", "COMFY_CLUSTER_INSTANCE_COUNT": "2",
      "COMFY_CLUSTER_ROLE": "FOLLOWER"},
     "COMFY_CLUSTER_ROLE=FOLLOWER disagrees with COMFY_CLUSTER_INSTANCE_INDEX=0"),
    ({"COMFY_CLUSTER_INSTANCE_INDEX": "1", "COMFY_CLUSTER_INSTANCE_COUNT": "2",
      "COMFY_CLUSTER_ROLE": "LEADER"}, "set COMFY_CLUSTER_ROLE=FOLLOWER or unset it"),
    ({"COMFY_CLUSTER_INSTANCE_INDEX": "0", "COMFY_CLUSTER_INSTANCE_COUNT": "2",
      "COMFY_CLUSTER_ROLE": "boss"}, "COMFY_CLUSTER_ROLE='boss' is not LEADER or FOLLOWER"),
    ({"COMFY_CLUSTER_INSTANCE_INDEX": "0"}, "COMFY_CLUSTER_INSTANCE_COUNT is missing"),
    ({"COMFY_CLUSTER_ROLE": "LEADER"}, "COMFY_CLUSTER_INSTANCE_INDEX is missing"),
    ({"OMPI_COMM_WORLD_RANK": "0"},
     "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is missing"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2"}, "SLURM_PROCID=3 is not < SLURM_NTASKS=2"),
]  # fmt: skip


@pytest.mark.parametrize(("env", "message"), BAD)
def test_bad_configuration_is_one_line_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        read_rank_env(env)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    got = read_rank_env()
    assert got is not None and (got.rank, got.world_size) == (1, 3)


@pytest.mark.parametrize(
    "name",
    ["OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMI_SIZE", "PMI_FD",
     "HYDI_CONTROL_FD", "MPI_LOCALRANKID", "PMIX_RANK"],
)  # fmt: skip
def test_detect_mpi_launcher(name: str) -> None:
    assert detect_mpi_launcher({name: "3"})


def test_no_mpi_launcher() -> None:
    assert not detect_mpi_launcher({})
    assert not detect_mpi_launcher({"RANK": "0", "WORLD_SIZE": "1", "SLURM_PROCID": "0"})
    assert not detect_mpi_launcher({"PMI_RANK": ""})
