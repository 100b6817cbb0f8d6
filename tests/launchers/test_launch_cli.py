"""comfycluster-launch: argument handling, one-line errors with exit status 2, a real run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_cluster.launchers.cli import main, parse_args

PY = sys.executable
SHOW_RANK = "import os; print(os.environ['RANK'])"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "x", "--", "true"], "argument --nproc/--nproc-per-node: invalid int value"),
        (["--", "true"], "the following arguments are required: --nproc"),
        (["--nproc", "2"], "no command given"),
        (["--nproc", "2", "--"], "no command given"),
        (["--nproc", "0", "--", "true"], "--nproc 0 must be at least 1"),
        (["--nproc", "2", "--node-rank-offset", "1", "--", "true"], "needs --world-size"),
        (["--nproc", "2", "--bogus", "--", "true"], "unrecognized arguments: --bogus"),
        (["--nproc", "1", "--env", "NOEQUALS", "--", "true"], "expected NAME=VALUE"),
        (["--nproc", "1", "--timeout", "-1", "--", "true"], "--timeout -1.0 must be positive"),
    ],
)  # fmt: skip
def test_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("comfycluster-launch: error: ")
    assert message.replace(" must be positive", " must be a positive") in err


def test_separator_is_optional_and_a_later_one_belongs_to_the_command() -> None:
    assert parse_args(["--nproc", "2", "--", "python", "x.py"]).command == ["python", "x.py"]
    assert parse_args(["--nproc", "2", "python", "-u", "x.py"]).command == ["python", "-u", "x.py"]
    config = parse_args(["--nproc", "2", "python", "x.py", "--", "--flag"])
    assert config.command == ["python", "x.py", "--", "--flag"]
    config = parse_args(["--nproc", "2", "--", "python", "--", "x"])
    assert config.command == ["python", "--", "x"]


def test_options_map_onto_the_config() -> None:
    argv = [
        "--nproc-per-node", "2", "--backend", "mpi", "--master-addr", "10.0.0.1",
        "--master-port", "29500", "--node-rank-offset", "2", "--world-size", "4",
        "--timeout", "9", "--kill-grace", "1", "--no-prefix", "--env", "A=1",
        "--env", "B=x=y", "--", "prog",
    ]  # fmt: skip
    config = parse_args(argv)
    assert (config.nproc, config.backend, config.master_addr, config.master_port) == (
        2, "mpi", "10.0.0.1", 29500
    )  # fmt: skip
    assert (config.rank_offset, config.world_size, config.timeout_s) == (2, 4, 9.0)
    assert (config.kill_grace_s, config.prefix_output) == (1.0, False)
    assert config.env == {"A": "1", "B": "x=y"}


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--nproc" in capsys.readouterr().out


def test_main_runs_and_returns_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    # Rank 1 fails only after rank 0 has surely printed (the launcher stops the others at once).
    code = (
        "import os, sys, time; print('hi', flush=True); r = int(os.environ['RANK']); "
        "time.sleep(1.5 * r); sys.exit(r and 7)"
    )
    assert main(["--nproc", "2", "--", PY, "-c", code]) == 7
    out = capsys.readouterr().out
    assert "[rank 0] hi" in out and "[rank 1] hi" in out


def test_python_dash_m(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(repo)]))
    ok = subprocess.run(
        [PY, "-m", "comfyui_cluster.launchers", "--nproc", "2", PY, "-c", SHOW_RANK],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=30, check=False,
    )  # fmt: skip
    assert ok.returncode == 0
    assert sorted(ok.stdout.splitlines()) == ["[rank 0] 0", "[rank 1] 1"]
    bad = subprocess.run(
        [PY, "-m", "comfyui_cluster.launchers", "--nproc", "two"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.startswith("comfycluster-launch: error: argument --nproc")
    assert bad.stderr.count("\n") == 1
