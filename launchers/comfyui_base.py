"""The base directory a ComfyUI cluster runs in: custom node links and per-rank state.

Layout (``--base-directory``, or a fresh temporary directory)::

    BASE/custom_nodes/ComfyUI_Cluster -> this node pack (the repository root)
    BASE/custom_nodes/<name>          -> every --extra-custom-nodes package
    BASE/models/ ...                  (ComfyUI's usual model folders, shared by all ranks)
    BASE/rank<i>/{output,temp,user}   (per rank: never shared, see rank_state_dirs)

Symbolic links, not copies: the servers run the code in the checkout, so an edit shows up on the
next start, and the links are all that is removed with a temporary base directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from collectives.errors import ConfigurationError

NODE_PACK_LINK = "ComfyUI_Cluster"


def default_node_pack() -> Path | None:
    """The repository root this module lives in, when it is a ComfyUI node pack.

    A plain (non-editable) install puts ``launchers`` into site-packages, whose parent is no
    node pack: then the caller must say where the pack is.
    """
    root = Path(__file__).resolve().parent.parent
    return root if is_node_pack(root) else None


def is_node_pack(path: Path) -> bool:
    """A folder ComfyUI loads as a custom node package: it has an ``__init__.py``."""
    return path.is_dir() and (path / "__init__.py").is_file()


def _is_loadable(path: Path) -> bool:
    # ComfyUI loads folders with __init__.py and single .py files from custom_nodes.
    return is_node_pack(path) or (path.is_file() and path.suffix == ".py")


def custom_node_packages(path: Path) -> list[Path]:
    """The packages an ``--extra-custom-nodes`` argument names.

    A package itself (a folder with ``__init__.py``, or a ``.py`` file) names just itself; any
    other folder is a collection (like ComfyUI's own ``custom_nodes``), and every package in it
    is taken.
    """
    if not path.exists():
        raise ConfigurationError(
            f"--extra-custom-nodes {str(path)!r} does not exist: pass a custom node package "
            "or a folder of them"
        )
    if _is_loadable(path):
        return [path]
    if not path.is_dir():
        raise ConfigurationError(
            f"--extra-custom-nodes {str(path)!r} is neither a folder nor a .py file: pass a "
            "custom node package or a folder of them"
        )
    found = sorted(child for child in path.iterdir() if _is_loadable(child))
    if not found:
        raise ConfigurationError(
            f"--extra-custom-nodes {str(path)!r} holds no custom node package (a folder with "
            "__init__.py or a .py file): pass the package folder itself"
        )
    return found


def _link(custom_nodes: Path, name: str, target: Path) -> None:
    """``custom_nodes/name -> target``; an identical link is kept, anything else is an error."""
    link = custom_nodes / name
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return  # a base directory used before: same link, nothing to do
        raise ConfigurationError(
            f"{link} exists and is not {target}: remove it, or use another --base-directory"
        )
    try:
        link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
    except FileExistsError:  # another process (an MPI rank) linked it just now: check theirs
        _link(custom_nodes, name, target)


def prepare_base(base: Path, node_pack: Path, extra_custom_nodes: list[Path]) -> None:
    """Create ``base/custom_nodes`` with the node pack and the extra packages linked in.

    When the node pack is already installed there under any name (a user's ComfyUI folder with
    the pack cloned into it), it is not linked a second time: ComfyUI would register every node
    twice.
    """
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)  # ComfyUI fails at start-up without it
    pack = node_pack.resolve()
    present = {entry.resolve() for entry in custom_nodes.iterdir()}
    if pack not in present:
        _link(custom_nodes, NODE_PACK_LINK, pack)
    names: dict[str, Path] = {}
    for source in extra_custom_nodes:
        for package in custom_node_packages(source):
            if package.resolve() == pack:
                continue
            if package.name in names and names[package.name] != package.resolve():
                raise ConfigurationError(
                    f"two custom node packages are named {package.name!r} ({names[package.name]} "
                    f"and {package}): ComfyUI can load only one; pass one of them"
                )
            names[package.name] = package.resolve()
            _link(custom_nodes, package.name, package)


def check_writable(base: Path) -> None:
    """Fail with the fix, not with N tracebacks, when the base directory cannot be used."""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"--base-directory {str(base)!r} cannot be created ({exc.strerror}): pass a "
            "writable folder"
        ) from None
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"--base-directory {str(base)!r} is not writable: pass a writable folder"
        )


__all__ = [
    "NODE_PACK_LINK",
    "check_writable",
    "custom_node_packages",
    "default_node_pack",
    "is_node_pack",
    "prepare_base",
]
