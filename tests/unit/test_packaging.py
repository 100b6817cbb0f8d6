"""The node pack's requirements.txt (what ComfyUI-Manager installs) is the package's own
runtime dependencies, and never torch (ComfyUI's own build must not be replaced)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_requirements_txt_matches_the_package_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(_requirements()) == sorted(project["dependencies"])


def test_requirements_txt_never_names_torch() -> None:
    assert not [r for r in _requirements() if r.lower().startswith(("torch", "torchvision"))]


def test_registry_metadata_is_present() -> None:
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["DisplayName"] and comfy["PublisherId"]
