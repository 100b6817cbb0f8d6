"""Command line of ``python -m benchmarks e2e`` (parsing and checks only)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

MEASUREMENTS = ("scaling", "overhead", "ksampler", "upstream")


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want integers >= 1, got {text!r}")
    return sorted(set(values))


def _measurements(text: str) -> list[str]:
    picked = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [p for p in picked if p not in MEASUREMENTS]
    if unknown or not picked:
        raise argparse.ArgumentTypeError(
            f"unknown measurement {', '.join(unknown) or '(none)'}: pick from "
            f"{', '.join(MEASUREMENTS)}"
        )
    return [m for m in MEASUREMENTS if m in picked]


def _threads(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"want 'auto' or a positive count, got {text!r}")
    return int(text)


def _non_negative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"want a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks e2e",
        description="Start an N-rank ComfyUI cluster (CPU) for every N, time workflows "
        "queued on the leader; print tables, write JSON (all samples) and a PNG.",
    )
    add = parser.add_argument
    add("--backend", default="udp", choices=("udp", "gloo", "mpi"),
        help="the cluster's backend (default: %(default)s, the launcher's default)")  # fmt: skip
    add("--ranks", type=_positive_ints, default=[1, 2, 4], metavar="N[,N...]",
        help="cluster sizes (default: 1,2,4); speedups need 1 among them")  # fmt: skip
    add("--images", type=int, default=8, metavar="B",
        help="batch of the scaling, overhead, ksampler and upstream workflows "
        "(default: %(default)s)")  # fmt: skip
    add("--many-images", type=int, default=32, metavar="B",
        help="second batch of the overhead measurement, to amortise the per-prompt cost "
        "(default: %(default)s; 0 skips it)")  # fmt: skip
    add("--sleep-per-image", type=_non_negative, default=0.5, metavar="S",
        help="SleepPerImage seconds per image in the scaling and upstream workflows "
        "(default: %(default)s)")  # fmt: skip
    add("--size", type=int, default=512, metavar="PX",
        help="IndexedImages width and height (float32 RGB; default: %(default)s)")  # fmt: skip
    add("--ksampler-steps", type=int, default=3, metavar="K",
        help="KSampler steps of the ksampler and upstream workflows "
        "(default: %(default)s)")  # fmt: skip
    add("--ksampler-size", type=int, default=64, metavar="PX",
        help="their EmptyLatentImage width and height (default: %(default)s)")  # fmt: skip
    add("--repeats", type=int, default=2, metavar="R",
        help="timed runs per variant after one warm-up; tables show medians "
        "(default: %(default)s)")  # fmt: skip
    add("--only", type=_measurements, default=list(MEASUREMENTS), metavar="M[,M...]",
        help=f"measurements to run (default: {','.join(MEASUREMENTS)})")  # fmt: skip
    add("--settle", type=_non_negative, default=0.25, metavar="S",
        help="pause before every prompt so followers are idle again "
        "(default: %(default)s)")  # fmt: skip
    add("--threads-per-rank", type=_threads, default=None, metavar="auto|T",
        help="OMP_NUM_THREADS of every rank; auto: CPU cores // N, at least 1")  # fmt: skip
    add("--python", metavar="PATH",
        help="python of the ComfyUI environment (default: .venv-comfy/bin/python)")  # fmt: skip
    add("--ready-timeout", type=float, default=300.0, metavar="S",
        help="per cluster: servers up and /cluster/status ready "
        "(default: %(default)s)")  # fmt: skip
    add("--prompt-timeout", type=float, default=600.0, metavar="S", help="default: %(default)s")
    add("--op-timeout", type=float, default=120.0, metavar="S",
        help="COMFY_CLUSTER_TIMEOUT of the ranks (default: %(default)s)")  # fmt: skip
    add("--json", type=Path, metavar="PATH",
        help="default: benchmarks/results/e2e-<time>.json")  # fmt: skip
    add("--png", type=Path, metavar="PATH", help="default: the JSON path, .png")
    add("--no-png", action="store_true", help="skip the plot")
    add("--workdir", type=Path, metavar="DIR",
        help="keep models, base directories and server logs here (default: a temporary "
        "directory on /dev/shm where there is one, removed at exit)")  # fmt: skip
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("images", "size", "ksampler_steps", "ksampler_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.many_images < 0:
        parser.error("--many-images must be >= 0")
    if args.ksampler_size % 8:
        parser.error("--ksampler-size must be a multiple of 8 (latent pixels)")
    if {"scaling", "upstream"} & set(args.only) and args.sleep_per_image <= 0:
        parser.error("--sleep-per-image must be > 0 for the scaling and upstream measurements")
