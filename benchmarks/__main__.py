"""``python -m benchmarks [SUBCOMMAND] [ARGS]``; without a subcommand, lists them."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmarks import SUBCOMMANDS

USAGE_EXIT = 2


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: python -m benchmarks SUBCOMMAND [ARGS ...]",
        "       python -m benchmarks SUBCOMMAND --help",
        "",
        "subcommands:",
    ]
    for sub in SUBCOMMANDS.values():
        note = "" if sub.available() else f"  (not available: no module {sub.module})"
        lines.append(f"  {sub.name.ljust(width)}  {sub.summary}{note}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else USAGE_EXIT
    sub = SUBCOMMANDS.get(args[0])
    if sub is None:
        print(f"python -m benchmarks: unknown subcommand {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return USAGE_EXIT
    if not sub.available():
        print(
            f"python -m benchmarks: {sub.name} is not available here (no module {sub.module})",
            file=sys.stderr,
        )
        return USAGE_EXIT
    return sub.run(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
