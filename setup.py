"""Builds the compiled transport core (mypyc) next to the metadata in pyproject.toml.

The modules listed in collectives/_compiled.py (``COMPILED``) are compiled to C with mypyc when
it and a C compiler are at hand; the package stays pure Python otherwise, or with
``COMFY_CLUSTER_PURE_PYTHON=1`` at install time.  A failed compile warns and installs the pure
package: the compiled core is a speed-up, never a requirement (docs/udp-transport.md).
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# One shared library inside the package, not a top-level name of its own.
GROUP = "collectives.transport._core"


def _constant(name: str) -> object:
    """A constant of collectives/_compiled.py, read from its text (the package cannot be
    imported while it is being built)."""
    tree = ast.parse((HERE / "collectives" / "_compiled.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"collectives/_compiled.py defines no {name}")


def compiled_modules() -> list[str]:
    return list(_constant("COMPILED"))  # type: ignore[call-overload]  # (a tuple of str)


def _pure(why: str) -> None:
    print(f"comfyui-cluster: installing the pure-Python transport ({why})", file=sys.stderr)


PURE_ENV = str(_constant("PURE_ENV"))


def _mypyc_extensions() -> list[Extension]:
    """Generate the C code and its extensions: slow (a type check and ~100k lines of C), so only
    when build_ext runs, not at every setup.py call of an install."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        _pure(f"{PURE_ENV} is set")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _pure("mypyc is not installed")
        return []
    paths = [str(Path(*name.split(".")).with_suffix(".py")) for name in compiled_modules()]
    # Not the project's mypy config (strict, which scripts/test.sh runs): in an isolated build
    # environment torch, numpy and cryptography are absent, and their types would not change the
    # C code (calls into them stay Python calls).  The repository root is itself a package (a
    # ComfyUI node pack), hence explicit package bases.
    flags = [
        "--config-file=",
        "--ignore-missing-imports",
        "--follow-imports=silent",
        "--explicit-package-bases",
    ]
    try:
        return list(mypycify(flags + paths, opt_level="3", group_name=GROUP))
    except BaseException as err:  # mypyc reports type errors by SystemExit
        _pure(f"mypyc failed: {err!r}")
        return []


# The commands that build: egg_info (each metadata step of an install) and sdist also finalize
# build_ext, and must not generate the C code every time.
_BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


class CompileTransport(build_ext):
    """build_ext that compiles the transport core, or leaves the package pure when it cannot."""

    def finalize_options(self) -> None:
        building = _BUILDING & set(self.distribution.commands)
        self.distribution.ext_modules = _mypyc_extensions() if building else []
        super().finalize_options()

    def run(self) -> None:
        try:
            super().run()
        except Exception as err:  # no compiler or headers: DistutilsPlatformError, CompileError
            _pure(f"compiling failed: {err}")
            self.extensions = self.distribution.ext_modules = []


# A placeholder that makes setuptools run build_ext (and tag the wheel for this platform);
# CompileTransport replaces it with mypyc's extensions.
setup(
    ext_modules=[Extension(GROUP + "__placeholder", sources=[])],
    cmdclass={"build_ext": CompileTransport},
)
