"""launch()/start() with real processes: variables, prefixes, fail-fast, timeout, cleanup."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from comfyui_cluster.launchers import LaunchConfig, RankSlot, launch, start

PY = sys.executable


def _py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def _alive(pid: int) -> bool:
    """Running (zombies count as gone: in a container nobody may reap an orphan)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _run(config: LaunchConfig) -> tuple[int, list[str], float]:
    out = io.StringIO()
    began = time.monotonic()
    code = launch(config, stdout=out)
    return code, out.getvalue().splitlines(), time.monotonic() - began


def _no_launcher_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("launchers-")]


def test_three_ranks_get_their_variables() -> None:
    code = """
        import os, sys
        names = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "COMFY_CLUSTER_INSTANCE_INDEX", "COMFY_CLUSTER_INSTANCE_COUNT",
                 "COMFY_CLUSTER_ROLE", "COMFY_CLUSTER_BACKEND", "PYTHONUNBUFFERED", "EXTRA"]
        print(" ".join(f"{n}={os.environ.get(n)}" for n in names))
        print("to stderr", file=sys.stderr)
    """
    config = LaunchConfig(nproc=3, command=_py(code), backend="local", env={"EXTRA": "x"})
    status, lines, _ = _run(config)
    assert status == 0
    assert _no_launcher_threads()
    by_rank = {}
    for line in lines:
        match = re.fullmatch(r"\[rank (\d)\] (.*)", line)
        assert match, line
        if match[2] != "to stderr":
            by_rank[int(match[1])] = dict(kv.split("=", 1) for kv in match[2].split())
    assert sorted(by_rank) == [0, 1, 2]
    assert sum(line.endswith("to stderr") for line in lines) == 3
    port = by_rank[0]["MASTER_PORT"]
    assert port.isdigit()
    for rank, env in by_rank.items():
        assert env == {
            "RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "COMFY_CLUSTER_INSTANCE_INDEX": str(rank), "COMFY_CLUSTER_INSTANCE_COUNT": "3",
            "COMFY_CLUSTER_ROLE": "LEADER" if rank == 0 else "FOLLOWER",
            "COMFY_CLUSTER_BACKEND": "local", "PYTHONUNBUFFERED": "1", "EXTRA": "x",
        }  # fmt: skip


def test_lines_never_interleave_and_partial_last_line_is_kept() -> None:
    code = """
        import os, sys
        r = os.environ["RANK"]
        for i in range(2000):
            stream = sys.stdout if i % 2 else sys.stderr
            stream.write(f"{r}:{i}:" + r * 300 + "\\n")
        sys.stdout.write("no newline " + r)
    """
    status, lines, _ = _run(LaunchConfig(nproc=3, command=_py(code)))
    assert status == 0
    assert len(lines) == 3 * 2001
    for line in lines:
        match = re.fullmatch(r"\[rank (\d)\] (?:(\d):(\d+):(\d{300})|no newline (\d))", line)
        assert match, line[:80]
        rank = match[1]
        assert rank == (match[2] or match[5])
        assert match[4] is None or match[4] == rank * 300


def test_first_failure_stops_the_rest_quickly() -> None:
    code = """
        import os, subprocess, sys, time
        rank = int(os.environ["RANK"])
        if rank == 1:
            time.sleep(0.5)
            sys.exit(3)
        child = subprocess.Popen(["sleep", "60"])  # a grandchild: the whole tree must go
        print(f"pids {os.getpid()} {child.pid}", flush=True)
        time.sleep(60)
    """
    status, lines, elapsed = _run(LaunchConfig(nproc=3, command=_py(code)))
    assert status == 3
    assert elapsed < 5
    pids = [int(p) for line in lines if "pids" in line for p in line.split()[3:]]
    assert len(pids) == 4
    assert not [pid for pid in pids if _alive(pid)]
    assert lines[-1] == "[launcher] rank 1 exited with code 3; stopped the other ranks"
    assert _no_launcher_threads()


def test_ranks_ignoring_sigterm_are_killed_after_the_grace() -> None:
    code = """
        import os, signal, sys, time
        if os.environ["RANK"] == "0":
            time.sleep(0.3)
            sys.exit(5)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    """
    status, _, elapsed = _run(LaunchConfig(nproc=2, command=_py(code), kill_grace_s=0.5))
    assert status == 5
    assert elapsed < 3


def test_killed_by_signal_is_128_plus_signum() -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert _run(LaunchConfig(nproc=2, command=_py(code)))[0] == 128 + signal.SIGKILL


def test_timeout_returns_124_and_stops_everything() -> None:
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    status, lines, elapsed = _run(LaunchConfig(nproc=2, command=_py(code), timeout_s=0.5))
    assert status == 124
    assert elapsed < 3
    assert lines[-1] == "[launcher] timed out after 0.5 s; stopping all ranks"
    pids = [int(line.split()[-1]) for line in lines if not line.startswith("[launcher]")]
    assert len(pids) == 2 and not [pid for pid in pids if _alive(pid)]


def test_success_leaves_no_stray_grandchild() -> None:
    code = """
        import subprocess
        print(subprocess.Popen(["sleep", "60"]).pid)
    """
    status, lines, _ = _run(LaunchConfig(nproc=1, command=_py(code), kill_grace_s=1))
    assert status == 0
    assert not _alive(int(lines[0].split()[-1]))


def test_multi_node_slice_and_per_rank_hooks() -> None:
    def per_rank_env(slot: RankSlot) -> dict[str, str]:
        return {"PORT": str(8188 + slot.local_rank), "RANK": "ignored: the launcher's wins"}

    def per_rank_command(slot: RankSlot) -> list[str]:
        return _py(f"import os; print('{slot.rank}', os.environ['RANK'], os.environ['PORT'], "
                   "os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK'], "
                   "os.environ['COMFY_CLUSTER_ROLE'])")  # fmt: skip

    config = LaunchConfig(
        nproc=2, command=["unused"], rank_offset=2, world_size=4, master_port=29999,
        per_rank_env=per_rank_env, per_rank_command=per_rank_command,
    )  # fmt: skip
    status, lines, _ = _run(config)
    assert status == 0
    assert sorted(lines) == [
        "[rank 2] 2 2 8188 4 0 FOLLOWER",
        "[rank 3] 3 3 8189 4 1 FOLLOWER",
    ]


def test_start_gives_a_group_to_supervise() -> None:
    config = LaunchConfig(nproc=2, command=_py("import time; time.sleep(60)"), kill_grace_s=1)
    with start(config, stdout=io.StringIO()) as group:
        assert group.ranks == [0, 1] and len(group.pids) == 2
        assert group.wait(timeout=0.2) is None
        assert group.poll() is None
        pids = group.pids
    assert not [pid for pid in pids if _alive(pid)]
    assert group.returncodes == {0: 128 + signal.SIGTERM, 1: 128 + signal.SIGTERM}
    assert _no_launcher_threads()


def test_without_prefix_children_write_to_fds_directly(capfd: pytest.CaptureFixture[str]) -> None:
    # One write(2) per child: print() makes two under PYTHONUNBUFFERED=1 (CI sets it), and two
    # children's "plain" and "\n" could then interleave on the shared descriptor.
    child = "import os; os.write(1, b'plain\\n')"
    config = LaunchConfig(nproc=2, command=_py(child), prefix_output=False)
    assert launch(config) == 0
    assert capfd.readouterr().out.splitlines() == ["plain", "plain"]


def test_missing_program_is_a_configuration_error() -> None:
    from collectives.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="cannot start 'no-such-program-xyz'"):
        launch(LaunchConfig(nproc=2, command=["no-such-program-xyz"]))
    assert _no_launcher_threads()


def _launcher(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(repo)]))
    return subprocess.Popen(
        [PY, "-m", "comfyui_cluster.launchers", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip


def test_sigint_to_the_launcher_is_forwarded(tmp_path: Path) -> None:
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    proc = _launcher(tmp_path, "--nproc", "2", "--", *_py(code))
    assert proc.stdout is not None
    pids = [int(proc.stdout.readline().split()[-1]) for _ in range(2)]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGINT
    assert "[launcher] got SIGINT" in err
    assert not [pid for pid in pids if _alive(pid)]


def test_second_signal_kills_without_waiting_for_the_grace(tmp_path: Path) -> None:
    code = """
        import os, signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(os.getpid(), flush=True)
        time.sleep(60)
    """
    proc = _launcher(tmp_path, "--nproc", "2", "--kill-grace", "30", "--", *_py(code))
    assert proc.stdout is not None
    pids = [int(proc.stdout.readline().split()[-1]) for _ in range(2)]
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM
    assert time.monotonic() - began < 5
    assert not [pid for pid in pids if _alive(pid)]


def test_ranks_can_read_what_the_launcher_exported() -> None:
    import collectives

    package_root = str(Path(collectives.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), package_root]))
    code = "from comfyui_cluster.launchers.env import read_rank_env; print(read_rank_env())"
    status, lines, _ = _run(
        LaunchConfig(nproc=2, command=_py(code), env={"PYTHONPATH": path}, master_port=29876)
    )
    assert status == 0
    assert sorted(lines) == [
        "[rank 0] RankEnv(rank=0, world_size=2, local_rank=0, master_addr='127.0.0.1', "
        "master_port=29876, role='leader', source='torchrun')",
        "[rank 1] RankEnv(rank=1, world_size=2, local_rank=1, master_addr='127.0.0.1', "
        "master_port=29876, role='follower', source='torchrun')",
    ]
