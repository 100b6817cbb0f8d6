"""Files the nodes read by name from one of ComfyUI's folders, never by raw path."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath


def relative_name(text: str) -> PurePosixPath | None:
    """``text`` as a path relative to a folder (``\\`` read as ``/``), or None when it is not
    one: blank, absolute, with a drive, or with a ``..`` part."""
    pure = PurePosixPath(text.replace("\\", "/"))
    if not text.strip() or pure.is_absolute() or PureWindowsPath(text).drive or ".." in pure.parts:
        return None
    return pure


def contained_file(folder: Path, relative: str, what: str, name: str, where: str) -> Path:
    """``relative`` inside ``folder`` with every symlink resolved; ``ValueError`` (naming the
    node ``what``, the ``name`` it was given and ``where``, the folder's description) unless
    it stays inside the folder."""
    root = folder.resolve()
    file = (root / relative).resolve()
    if not file.is_relative_to(root):
        raise ValueError(f"{what}: {name!r} leads outside {where} {folder}")
    return file
