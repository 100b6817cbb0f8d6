"""A stand-in for ComfyUI's ``folder_paths`` (the same functions, over a temporary base folder)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest


def fake_folder_paths(base: Path) -> types.ModuleType:
    """The parts of ComfyUI's ``folder_paths`` the node pack uses, behaving as ComfyUI's do."""
    module = types.ModuleType("folder_paths")
    dirs = {name: base / name for name in ("input", "output", "temp", "user")}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)

    def annotated_filepath(name: str) -> tuple[str, str | None]:
        for tag in ("output", "input", "temp"):
            if name.endswith(f"[{tag}]"):
                return name[: -len(tag) - 3], str(dirs[tag])
        return name, None

    def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
        name, base_dir = annotated_filepath(name)
        return os.path.join(base_dir or default_dir or str(dirs["input"]), name)

    module.annotated_filepath = annotated_filepath  # type: ignore[attr-defined]
    module.get_annotated_filepath = get_annotated_filepath  # type: ignore[attr-defined]
    module.get_input_directory = lambda: str(dirs["input"])  # type: ignore[attr-defined]
    module.get_output_directory = lambda: str(dirs["output"])  # type: ignore[attr-defined]
    module.get_temp_directory = lambda: str(dirs["temp"])  # type: ignore[attr-defined]
    module.get_user_directory = lambda: str(dirs["user"])  # type: ignore[attr-defined]
    return module


@pytest.fixture
def comfy_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ComfyUI's folders under ``tmp_path`` (input/, output/, temp/, user/), as ``folder_paths``."""
    base = tmp_path / "comfy"
    monkeypatch.setitem(sys.modules, "folder_paths", fake_folder_paths(base))
    return base
