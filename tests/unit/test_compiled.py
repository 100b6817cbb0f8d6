"""The compiled transport core (collectives/_compiled.py, setup.py): what is compiled, that a
build with a compiler runs it, and when the source runs instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collectives import _compiled

REPO = Path(__file__).resolve().parents[2]
TRANSPORT = REPO / "collectives" / "transport"


def test_every_transport_module_is_in_the_compiled_list() -> None:
    on_disk = {f"collectives.transport.{p.stem}" for p in TRANSPORT.glob("*.py")} - {
        "collectives.transport.__init__"
    }
    assert set(_compiled.COMPILED) == on_disk


def test_setup_compiles_exactly_that_list() -> None:
    # setup.py reads the list from the text of _compiled.py (it cannot import the package).
    ns: dict[str, object] = {"__name__": "not_main", "__file__": str(REPO / "setup.py")}
    code = (REPO / "setup.py").read_text().split("\n# A placeholder")[0]
    exec(compile(code, "setup.py", "exec"), ns)  # everything before its setup() call
    assert ns["compiled_modules"]() == list(_compiled.COMPILED)  # type: ignore[operator]
    assert ns["GROUP"] + "__mypyc" == _compiled.SHARED  # type: ignore[operator]
    assert ns["PURE_ENV"] == _compiled.PURE_ENV


def _can_compile() -> bool:
    try:
        import mypyc  # noqa: F401
    except ImportError:
        return False
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


def _run(code: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


_PROBE = (
    "import collectives, collectives.transport.session as s; "
    "from collectives import _compiled; "
    "print(_compiled.status()['mode'], s.__file__.endswith('.py'))"
)


@pytest.mark.skipif(not _can_compile(), reason="no C compiler or mypyc: the build stays pure")
def test_a_build_with_a_compiler_runs_the_compiled_core() -> None:
    status = _run(_PROBE, **{_compiled.PURE_ENV: ""}).stdout.strip()
    assert status == "compiled False", (
        f"{status}: the transport is not compiled although a compiler is here; "
        "run scripts/setup.sh (it rebuilds after a source edit)"
    )
    assert _compiled.extension_path(_compiled.SHARED) is not None  # inside the package


def test_the_switch_runs_the_source() -> None:
    assert _run(_PROBE, **{_compiled.PURE_ENV: "1"}).stdout.split() == ["python", "True"]


def _tree(tmp_path: Path, *, git: bool) -> Path:
    pkg = tmp_path / "collectives" / "transport"
    pkg.mkdir(parents=True)
    (pkg / "rtt.py").write_text("")
    (pkg / ("rtt" + _compiled.importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    if git:
        (tmp_path / ".git").mkdir()
    return tmp_path


def test_a_source_edited_after_the_build_is_stale_in_a_checkout(tmp_path: Path) -> None:
    root = _tree(tmp_path, git=True)
    name = "collectives.transport.rtt"
    ext = _compiled.extension_path(name, root)
    assert ext is not None
    src = _compiled.source_path(name, root)
    os.utime(src, (1_000, 1_000))
    os.utime(ext, (2_000, 2_000))
    assert _compiled.stale([name], root) == []
    os.utime(src, (3_000, 3_000))
    assert _compiled.stale([name], root) == [name]


def test_file_times_of_an_installed_package_are_not_read_as_staleness(tmp_path: Path) -> None:
    root = _tree(tmp_path, git=False)  # a wheel's files: times say nothing about build order
    name = "collectives.transport.rtt"
    os.utime(_compiled.source_path(name, root), (3_000, 3_000))
    assert _compiled.stale([name], root) == []


def test_a_stale_build_runs_the_source_and_says_so(tmp_path: Path) -> None:
    if _compiled.extension_path(_compiled.SHARED) is None or not (REPO / ".git").exists():
        pytest.skip("needs a compiled checkout")  # the pure build has nothing to go stale
    # A copy of the checkout's package with one source newer than its compiled file.
    copy = tmp_path / "repo"
    shutil.copytree(
        REPO / "collectives", copy / "collectives", ignore=shutil.ignore_patterns("__pycache__")
    )
    (copy / ".git").mkdir()
    src = copy / "collectives" / "transport" / "rtt.py"
    ext = _compiled.extension_path("collectives.transport.rtt", copy)
    assert ext is not None
    os.utime(src, (ext.stat().st_mtime + 3600,) * 2)  # newer than its build, whenever that was
    done = _run(_PROBE, cwd=copy, **{_compiled.PURE_ENV: "", "PYTHONPATH": str(copy)})
    assert done.stdout.split() == ["python", "True"]
    assert "older than its source (collectives.transport.rtt)" in done.stderr
