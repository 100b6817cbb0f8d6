"""``python -m benchmarks e2e``: whole workflows over a real cluster of ComfyUI servers.

    python -m benchmarks e2e --ranks 1,2,4 --images 8 --sleep-per-image 0.5 --size 512

For each rank count N this process starts N ComfyUI servers (``start_comfy_cluster``, backend
``--backend``, udp by default, on the CPU, the tiny models of tools/comfyui/make_tiny_sd.py built
once), waits until the leader's ``/cluster/status`` says ``ready`` and queues prompts on the
leader's ordinary ``POST /prompt``, one at a time.  Measured, after one warm-up run of each variant:

1. **scaling**: IndexedImages -> ClusterFanOutImage -> SleepPerImage -> ClusterFanInImages ->
   SaveTensor, a stand-in for per-image GPU work whose cost is known exactly (``images x sleep``
   on one instance, ``/ N`` ideally).  Speedup ``T1 / TN``, efficiency ``T1 / (N x TN)``.
2. **overhead**: the same chain with sleep 0 against the plain chain without cluster nodes, both
   on the leader, at ``--images`` and ``--many-images``; what the cluster adds per image (and the
   slope between the two counts, which cancels the per-prompt part), and a ClusterInfo-only
   prompt against the smallest plain prompt: the fixed cost of one cluster prompt.
3. **ksampler**: the tiny-model txt2img (EmptyLatentImage -> ClusterFanOutLatent -> KSampler ->
   VAEDecode -> ClusterFanInImages -> SaveImage), on CPU cores that the ranks share.
4. **upstream**: a generation on the leader feeding a fan-out (KSampler -> VAEDecode ->
   ClusterFanOutImage -> SleepPerImage -> ClusterFanInImages -> SaveTensor), a new seed per
   prompt.  Followers do not run the generation (the fan-out's input is lazy): the ideal at N
   ranks is T1's generation part, serial on the leader, plus 1/N of the sleep.

A prompt's time runs from ``POST /prompt`` to ComfyUI's websocket note that its history is
written (see ``e2e_client``).  Variants of one measurement alternate, in rotating order; a short
pause (``--settle``) before each prompt lets the followers re-arm, and is stretched where a rank
is expected to run ComfyUI's periodic ``gc.collect()`` (``e2e_gc``: ~0.4 s with the GIL held,
every 10 s, the same with or without a cluster); where a follower would collect right after a
timed cluster prompt, an untimed ClusterInfo prompt makes it collect first.  A sample that was
answered or started more than 100 ms late all the same is rerun (twice at most; the JSON keeps
it).  ``--threads-per-rank`` auto gives every rank cores // N torch threads, so N=1 already uses
every core: the KSampler's speedup on a CPU box is bounded by the cores, not by the ranks.
Server outputs go to tmpfs (``/dev/shm``) unless ``--workdir`` says otherwise.  Prints a progress
line on stderr, then tables; writes JSON (every sample) and a PNG.  Timings are never pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from benchmarks._report import machine_info, shm_warning
from benchmarks._timing import median
from benchmarks.e2e_args import MEASUREMENTS, _check_args, build_parser
from benchmarks.e2e_client import BenchClient, Timed
from benchmarks.e2e_gc import GcClocks
from benchmarks.e2e_report import build_rows, document, plot, tables
from benchmarks.e2e_workflows import (
    Workflow,
    cluster_info_workflow,
    images_workflow,
    ksampler_workflow,
    minimal_plain_workflow,
    upstream_workflow,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TOOLS = REPO / "tools" / "comfyui"
TEST_NODES = TOOLS / "test_nodes"
RUNNER = REPO / "launchers" / "comfyui_run.py"
INSTALL = "tools/comfyui/install.sh"
_LOG_TAIL = 40
MAX_RETRIES = 2  # reruns of a disturbed sample (the disturbed ones are kept in the JSON)
_VERSIONS = "import sys, torch; print(torch.__version__); print(sys.version.split()[0])"


# --- progress --------------------------------------------------------------------------------


class _Progress:
    """``[12/57] N=4 overhead cluster x8 (repeat 2/2) ...`` on stderr; in place on a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._tty = sys.stderr.isatty()
        self._width = 0

    def note(self, text: str, *, step: bool = False) -> None:
        if step:
            self.done += 1
        line = f"[{self.done}/{self.total}] {text} ..."
        if self._tty:
            sys.stderr.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def say(self, text: str) -> None:
        """A line that stays (errors, warnings)."""
        self.clear()
        print(text, file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self._tty and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One workflow of a measurement: ``build(nonce)`` gives a prompt new to ComfyUI's cache."""

    name: str
    images: int
    build: Callable[[int], Workflow]
    cluster: bool  # runs on every rank (else on the leader only)


@dataclass(frozen=True)
class Measurement:
    """Variants timed together: warm-up of each, then ``repeats`` rounds in rotating order."""

    key: str  # scaling | transfer | transfer_many | prompt | ksampler | upstream
    variants: tuple[Variant, ...]


def plan(args: argparse.Namespace) -> list[Measurement]:
    size, images, many = args.size, args.images, args.many_images

    def chain(cluster: bool, batch: int, sleep: float, name: str) -> Variant:
        label = "cluster" if cluster else "plain"
        return Variant(
            label,
            batch,
            lambda nonce: images_workflow(
                cluster=cluster, images=batch, size=size, sleep=sleep, nonce=nonce, name=name
            ),
            cluster,
        )

    out: list[Measurement] = []
    if "scaling" in args.only:
        out.append(
            Measurement("scaling", (chain(True, images, args.sleep_per_image, "e2e_scaling"),))
        )
    if "overhead" in args.only:
        out.append(
            Measurement(
                "transfer",
                (chain(True, images, 0.0, "e2e_tc"), chain(False, images, 0.0, "e2e_tp")),
            )
        )
        if many > 0 and many != images:
            out.append(
                Measurement(
                    "transfer_many",
                    (chain(True, many, 0.0, "e2e_mc"), chain(False, many, 0.0, "e2e_mp")),
                )
            )
        out.append(
            Measurement(
                "prompt",
                (
                    Variant("cluster_info", 0, lambda nonce: cluster_info_workflow(), True),
                    Variant(
                        "plain_min",
                        0,
                        lambda nonce: minimal_plain_workflow(nonce=nonce, name="e2e_min"),
                        False,
                    ),
                ),
            )
        )
    if "ksampler" in args.only:
        out.append(
            Measurement(
                "ksampler",
                (
                    Variant(
                        "cluster",
                        images,
                        lambda nonce: ksampler_workflow(
                            cluster=True,
                            images=images,
                            size=args.ksampler_size,
                            steps=args.ksampler_steps,
                            prefix="e2e_ksampler",
                        ),
                        True,
                    ),
                ),
            )
        )
    if "upstream" in args.only:
        out.append(
            Measurement(
                "upstream",
                (
                    Variant(
                        "cluster",
                        images,
                        lambda nonce: upstream_workflow(
                            images=images,
                            size=args.ksampler_size,
                            steps=args.ksampler_steps,
                            sleep=args.sleep_per_image,
                            nonce=nonce,
                            name="e2e_upstream",
                        ),
                        True,
                    ),
                ),
            )
        )
    return out


def prompts_per_cluster(measurements: Sequence[Measurement], repeats: int) -> int:
    return sum(len(m.variants) * (1 + repeats) for m in measurements)


# --- one cluster -----------------------------------------------------------------------------


@dataclass
class ClusterRun:
    ranks: int
    threads_per_rank: int
    ok: bool = False
    error: str | None = None
    startup_s: float | None = None  # launch -> every server answers /system_stats
    ready_s: float | None = None  # launch -> /cluster/status ready
    status: dict[str, Any] = field(default_factory=dict)
    loadavg: dict[str, list[float]] = field(default_factory=dict)  # before and after: how busy
    # measurement -> variant -> {"warmup": sample, "samples": [sample, ...]}
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    log_tail: str = ""


def _sample(timed: Timed, repeat: int) -> dict[str, Any]:
    return {
        "repeat": repeat,
        "wall_s": timed.wall_s,
        "queued_s": timed.queued_s,
        "server_s": timed.server_s,
        "prompt_id": timed.prompt_id,
    }


def _tail(path: Path, lines: int = _LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _free_ports(count: int) -> int:
    """First of ``count`` consecutive free ports, below the ephemeral range (like the tests)."""
    from comfyui_cluster.launchers.config import port_in_use

    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - count)
        if not any(port_in_use("127.0.0.1", p) for p in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def run_cluster(
    ranks: int,
    args: argparse.Namespace,
    measurements: Sequence[Measurement],
    python: str,
    models: Path,
    workdir: Path,
    progress: _Progress,
    nonces: Iterator[int],
) -> ClusterRun:
    from comfyui_cluster.launchers.comfyui import ComfyClusterConfig, start_comfy_cluster

    threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // ranks)
    run = ClusterRun(ranks, threads)
    root = workdir / f"ranks{ranks}"
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "models").symlink_to(models, target_is_directory=True)
    log_path = root / "cluster.log"
    config = ComfyClusterConfig(
        nproc=ranks,
        port=_free_ports(ranks),
        base_directory=str(base),
        python=python,
        backend=args.backend,
        gpus="none",
        extra_custom_nodes=[str(TEST_NODES)],
        ready_timeout_s=args.ready_timeout,
        env={
            "COMFY_CLUSTER_TIMEOUT": str(args.op_timeout),
            "COMFY_CLUSTER_JOIN_TIMEOUT": str(args.op_timeout),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        },
    )
    progress.note(f"N={ranks}: starting {ranks} ComfyUI server(s)")
    if hasattr(os, "getloadavg"):
        run.loadavg["start"] = list(os.getloadavg())
    began = time.monotonic()
    with log_path.open("w", buffering=1) as log:
        try:
            cluster = start_comfy_cluster(config, stdout=log)
        except Exception as exc:  # a configuration problem: nothing was started
            run.error = f"{type(exc).__name__}: {exc}"
            return run
        client: BenchClient | None = None
        try:
            cluster.wait_ready()
            run.startup_s = time.monotonic() - began
            client = BenchClient(cluster.leader_url, timeout=60.0)
            run.status = client.wait_cluster_ready(max(1.0, args.ready_timeout - run.startup_s))
            run.ready_s = time.monotonic() - began
            client.connect()
            gc = GcClocks(ranks, os.cpu_count() or 1)
            for measurement in measurements:
                _measure(client, ranks, measurement, args, progress, nonces, run, gc)
            run.ok = True
        except Exception as exc:  # recorded and reported; the other cluster sizes still run
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            if client is not None:
                client.close()
            cluster.stop()
    if hasattr(os, "getloadavg"):
        run.loadavg["end"] = list(os.getloadavg())
    if not run.ok:
        run.log_tail = _tail(log_path)
    return run


def _measure(
    client: BenchClient,
    ranks: int,
    measurement: Measurement,
    args: argparse.Namespace,
    progress: _Progress,
    nonces: Iterator[int],
    run: ClusterRun,
    gc: GcClocks,
) -> None:
    variants = measurement.variants
    store = run.results.setdefault(measurement.key, {})

    def one(variant: Variant, repeat: int) -> dict[str, Any]:
        label = "warm-up" if repeat == 0 else f"repeat {repeat}/{args.repeats}"
        batch = f" x{variant.images}" if variant.images else ""
        entry = store[variant.name]
        for attempt in range(1 + MAX_RETRIES):
            retry = f", retry {attempt}" if attempt else ""
            progress.note(
                f"N={ranks} {measurement.key} {variant.name}{batch} ({label}{retry})",
                step=attempt == 0,
            )
            done = [s["wall_s"] for s in (entry.get("warmup"), *entry["samples"]) if s]
            expected = median(done) if done else 0.0
            settled, post_at, flushes = _dodge_gc(client, gc, variant, expected, args)
            time.sleep(max(0.0, post_at - time.monotonic()))
            clocks = gc.involved(variant.cluster)
            gc.started(clocks, time.monotonic())
            try:
                timed = client.run(variant.build(next(nonces)), args.prompt_timeout)
            finally:
                gc.ended(clocks, time.monotonic())
            sample = _sample(timed, repeat)
            sample["gc_wait_s"] = post_at - settled
            sample["gc_flushes"] = flushes
            if not _disturbed(sample) or attempt == MAX_RETRIES:
                sample["retries"] = attempt
                return sample
            entry["discarded"].append(sample)
        raise AssertionError("unreachable")

    for variant in variants:
        store[variant.name] = {"images": variant.images, "samples": [], "discarded": []}
        store[variant.name]["warmup"] = one(variant, 0)
    for repeat in range(1, args.repeats + 1):
        shift = (repeat - 1) % len(variants)
        for variant in (*variants[shift:], *variants[:shift]):
            store[variant.name]["samples"].append(one(variant, repeat))


def _dodge_gc(
    client: BenchClient, gc: GcClocks, variant: Variant, expected: float, args: argparse.Namespace
) -> tuple[float, float, int]:
    """When to post the next prompt so that no rank runs ComfyUI's gc.collect() during it (see
    ``e2e_gc``); returns (earliest by --settle, chosen time, untimed flush prompts run)."""
    flushes = 0
    while True:
        settled = time.monotonic() + args.settle
        post_at = gc.clear_time(settled, expected)
        crossing = gc.crossing(post_at, expected) if variant.cluster else []
        if not crossing or flushes >= 3:
            return settled, post_at, flushes
        # Past the followers' 10 s mark, a cheap cluster prompt makes them collect now.
        time.sleep(max(0.0, max(gc.mark(crossing) + 0.05, post_at) - time.monotonic()))
        clocks = gc.involved(True)
        gc.started(clocks, time.monotonic())
        try:
            client.run(cluster_info_workflow(), args.prompt_timeout)
        finally:
            gc.ended(clocks, time.monotonic())
        flushes += 1


def _disturbed(sample: dict[str, Any]) -> bool:
    """The server answered late or started late: something (a collection the model missed,
    another process) held it up, not the prompt's own work."""
    late_start = sample["server_s"] is not None and sample["wall_s"] - sample["server_s"] > 0.1
    return bool(sample["queued_s"] > 0.1 or late_start)


# --- setup -----------------------------------------------------------------------------------


def _probe(python: str) -> dict[str, Any]:
    if not Path(python).exists():
        raise RuntimeError(
            f"no ComfyUI environment at {python}: run {INSTALL} from the repository root, "
            "or pass --python"
        )
    done = subprocess.run(
        [python, str(RUNNER), "--probe"], capture_output=True, text=True, timeout=120, check=False
    )
    try:
        report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {"error": f"probe failed (exit {done.returncode}): {done.stderr[-500:]}"}
    if "error" in report:
        raise RuntimeError(f"{python} cannot run ComfyUI: {report['error']}; run {INSTALL}")
    versions = subprocess.run(
        [python, "-c", _VERSIONS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout.split()
    if len(versions) == 2:
        report["torch_version"], report["python_version"] = versions
    return report


def _make_models(python: str, models: Path) -> None:
    done = subprocess.run(
        [python, str(TOOLS / "make_tiny_sd.py"), str(models)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"make_tiny_sd.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    # On tmpfs where there is one: SaveTensor writes up to ~100 MB per prompt, and disk
    # write-back would add its own noise to the timings.
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="e2e-bench-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_failure(run: ClusterRun, out: TextIO) -> None:
    print(f"N={run.ranks} failed: {run.error}", file=out)
    if run.log_tail:
        print(f"--- last lines of the servers' output (N={run.ranks}) ---", file=out)
        print(run.log_tail, file=out)
        print("---", file=out)


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    _check_args(parser, args)
    started = datetime.datetime.now().astimezone()
    clock = time.monotonic()
    machine = machine_info()  # load average before we add to it
    if (warning := shm_warning(machine)) is not None:
        print(warning, file=sys.stderr)

    from comfyui_cluster.launchers.comfyui import default_python

    python = args.python or default_python()
    try:
        comfy = _probe(python)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"python -m benchmarks e2e: {exc}", file=sys.stderr)
        return 2

    measurements = plan(args)
    progress = _Progress(len(args.ranks) * prompts_per_cluster(measurements, args.repeats))
    runs: list[ClusterRun] = []
    counter = iter(range(1, 1 << 62))
    with _workdir(args.workdir) as workdir:
        models = workdir / "models"
        progress.note("building the tiny models")
        try:
            _make_models(python, models)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            progress.say(f"python -m benchmarks e2e: {exc}")
            return 1
        for ranks in args.ranks:
            before = progress.done
            run = run_cluster(ranks, args, measurements, python, models, workdir, progress, counter)
            # A failed cluster's remaining prompts will not come: keep the count honest.
            progress.done = before + prompts_per_cluster(measurements, args.repeats)
            runs.append(run)
            if not run.ok:
                progress.clear()
                _print_failure(run, sys.stderr)
    progress.clear()

    if hasattr(os, "getloadavg"):
        machine["loadavg_at_end"] = list(os.getloadavg())
    seconds = time.monotonic() - clock
    rows = build_rows(runs, args)
    print(tables(rows, args))
    print()
    print(f"runtime {seconds:.1f} s")

    json_path = args.json or RESULTS / f"e2e-{started:%Y%m%d-%H%M%S}.json"
    doc = document(["e2e", *args_list], args, runs, rows, started, seconds, machine, comfy, REPO)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {json_path}")
    if not args.no_png and any(run.ok for run in runs):
        png_path = args.png or json_path.with_suffix(".png")
        plot(rows, args, png_path)
        print(f"wrote {png_path}")
    return 0 if all(run.ok for run in runs) else 1


__all__ = ["MEASUREMENTS", "ClusterRun", "build_parser", "main", "plan"]
