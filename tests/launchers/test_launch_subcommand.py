"""``comfycluster-launch`` subcommands: found before or after the launcher's options.

Only argument handling: nothing is started (``run`` and ``launch`` fail the test if called).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import comfyui_cluster.launchers as launchers
from comfyui_cluster.launchers.cli import SUBCOMMANDS, main
from comfyui_cluster.launchers.config import LaunchConfig

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
COMFY_USAGE = "usage: comfycluster-launch comfyui --nproc N"


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError("argument handling must not start anything")

    monkeypatch.setattr(launchers.comfyui, "run", refuse)
    monkeypatch.setattr(launchers.comfyui, "start_comfy_cluster", refuse)
    monkeypatch.setattr(launchers.cli, "launch", refuse)


@pytest.mark.parametrize(
    "argv",
    [
        ["--nproc", "2", "comfyui", "--help"],
        ["comfyui", "--nproc", "2", "--help"],
        ["--nproc=2", "--no-prefix", "comfyui", "--help"],
        ["--nproc", "2", "--master-port", "29500", "comfyui", "--port", "9000", "--help"],
    ],
)
def test_subcommand_help_before_or_after_the_options(
    argv: list[str], nothing_starts: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(COMFY_USAGE)
    assert "--ready-timeout" in out  # the comfyui parser's help, not the plain launcher's


def test_hoisted_options_reach_the_comfyui_parser(
    monkeypatch: pytest.MonkeyPatch, nothing_starts: None
) -> None:
    seen: list[launchers.comfyui.ComfyClusterConfig] = []

    def record(config: launchers.comfyui.ComfyClusterConfig, **kwargs: object) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(launchers.comfyui, "run", record)
    argv = ["--nproc", "3", "--env", "A=1", "comfyui", "--port", "9000", "--", "--cpu"]
    assert main(argv) == 0
    assert (seen[0].nproc, seen[0].port, seen[0].env) == (3, 9000, {"A": "1"})
    assert seen[0].comfy_args == ["--cpu"]


def test_hoisted_subcommand_reports_its_own_errors(
    nothing_starts: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--nproc", "2", "comfyui", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err == "comfycluster-launch comfyui: error: unrecognized arguments: --bogus\n"


def test_the_word_as_a_plain_command_argument_is_not_a_subcommand(
    monkeypatch: pytest.MonkeyPatch, nothing_starts: None
) -> None:
    commands: list[list[str]] = []

    def record(config: LaunchConfig) -> int:
        commands.append(config.command)
        return 0

    monkeypatch.setattr(launchers.cli, "launch", record)
    assert main(["--nproc", "2", "--", "python", "comfyui"]) == 0
    assert main(["--nproc", "2", "python", "comfyui"]) == 0
    assert commands == [["python", "comfyui"], ["python", "comfyui"]]


def test_comfyui_is_registered() -> None:
    assert SUBCOMMANDS["comfyui"] is launchers.comfyui.main


def _python(code_or_args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    return subprocess.run(
        [PY, *code_or_args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60,
        check=False,
    )  # fmt: skip


def test_imports_have_no_cycle_either_way(tmp_path: Path) -> None:
    # launchers.cli alone stays free of the comfyui modules until main() needs them, and
    # importing launchers.comfyui first registers the subcommand.
    cli_first = (
        "import sys, comfyui_cluster.launchers.cli; "
        "assert 'comfyui_cluster.launchers.comfyui' not in sys.modules; "
        "from comfyui_cluster.launchers.cli import SUBCOMMANDS, main; "
        "assert main(['comfyui', '--help']) == 0; "
        "assert 'comfyui' in SUBCOMMANDS"
    )
    comfy_first = (
        "import comfyui_cluster.launchers.comfyui; "
        "from comfyui_cluster.launchers.cli import SUBCOMMANDS; "
        "assert SUBCOMMANDS['comfyui'] is comfyui_cluster.launchers.comfyui.main"
    )
    for code in (cli_first, comfy_first):
        done = _python(["-c", code], tmp_path)
        assert done.returncode == 0, done.stderr


def test_python_dash_m_hoists_the_subcommand(tmp_path: Path) -> None:
    done = _python(
        ["-m", "comfyui_cluster.launchers", "--nproc", "2", "comfyui", "--help"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(COMFY_USAGE)


def test_comfyui_malloc_tuning_is_on_unless_turned_off() -> None:
    assert launchers.comfyui.parse_args(["--nproc", "2"]).malloc_tuning
    assert not launchers.comfyui.parse_args(["--nproc", "2", "--no-malloc-tuning"]).malloc_tuning
