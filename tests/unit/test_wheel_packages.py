"""The wheel's package list: complete, and no generic top-level names claimed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]


def _setuptools() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"])


def _on_disk(folder: str, name: str) -> set[str]:
    root = REPO / folder
    return {
        ".".join([name, *p.parent.relative_to(root).parts]).rstrip(".")
        for p in root.rglob("__init__.py")
        if "__pycache__" not in p.parts
    }


def test_every_package_on_disk_is_listed() -> None:
    listed = set(_setuptools()["packages"])  # type: ignore[call-overload]
    package_dir: dict[str, str] = _setuptools()["package-dir"]  # type: ignore[assignment]
    expected = _on_disk("collectives", "collectives") | _on_disk("comfy_nodes", "comfy_nodes")
    for name, folder in package_dir.items():
        if (REPO / folder / "__init__.py").exists():
            expected |= _on_disk(folder, name)
    assert listed == expected


def test_generic_names_install_under_the_project_namespace() -> None:
    listed: list[str] = _setuptools()["packages"]  # type: ignore[assignment]
    tops = {name.split(".")[0] for name in listed}
    assert tops == {"collectives", "comfy_nodes", "comfyui_cluster"}


def test_launchers_import_only_under_the_namespace_outside_the_checkout(tmp_path: Path) -> None:
    code = (
        "import importlib.util, comfyui_cluster.launchers.cli as c; "
        "print(importlib.util.find_spec('launchers') is None, callable(c.main))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
