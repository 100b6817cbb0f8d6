"""The main job: a 4-rank ComfyUI cluster runs workflows (a) and (b), prints where results are.

    python examples/comfy_cluster_demo.py [--ranks 4] [--images 8] [--workflows a,b]

Embedded default: tiny random-weight SD1.5-shaped models generated here (tools/comfyui), CPU.
Workflow (a), EmptyLatentImage(8) -> ClusterFanOutLatent -> KSampler -> VAEDecode ->
ClusterFanInImages -> SaveImage, is queued on the leader's ordinary POST /prompt; the node pack
hands it to every rank, each samples its share, and the leader saves all 8 images.
Workflow (b) (examples/photo_demo.py) fans eight looks of a real photograph out to the ranks,
which upscale and sharpen their share; the leader fans them in and saves a contact sheet, whose
path is the last line printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comfyui_cluster.launchers.comfyui import ComfyClusterConfig, start_comfy_cluster  # noqa: E402
from examples.photo_demo import LOOKS, SAVE_NODE, stage_photo, workflow_b  # noqa: E402
from tests.comfy_e2e.comfy_client import ComfyClient  # noqa: E402


def workflow_a(images: int) -> dict[str, dict[str, object]]:
    def node(class_type: str, **inputs: object) -> dict[str, object]:
        return {"class_type": class_type, "inputs": inputs}

    return {
        "1": node("UNETLoader", unet_name="tiny_sd15_unet.safetensors", weight_dtype="default"),
        "2": node("ZeroConditioning", tokens=77, width=768),
        "3": node("EmptyLatentImage", width=64, height=64, batch_size=images),
        "4": node("ClusterFanOutLatent", samples=["3", 0]),
        "5": node("KSampler", model=["1", 0], seed=42, steps=4, cfg=2.0, sampler_name="euler",
                  scheduler="normal", positive=["2", 0], negative=["2", 0],
                  latent_image=["4", 0], denoise=1.0),
        "6": node("VAELoader", vae_name="taesd"),
        "7": node("VAEDecode", samples=["5", 0], vae=["6", 0]),
        "8": node("ClusterFanInImages", images=["7", 0]),
        "9": node("SaveImage", images=["8", 0], filename_prefix="cluster_demo/a"),
    }  # fmt: skip


def executing_s(entry: dict[str, Any]) -> float:
    """Seconds between the leader's execution_start and execution_success of a finished prompt."""
    msgs = {m[0]: m[1] for m in entry["status"]["messages"]}
    return (
        float(msgs["execution_success"]["timestamp"] - msgs["execution_start"]["timestamp"]) / 1000
    )


def saved_paths(entry: dict[str, Any], node_id: str, out_dir: Path) -> list[Path]:
    return [
        out_dir / img["subfolder"] / img["filename"] for img in entry["outputs"][node_id]["images"]
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--workflows", default="a,b", help="which to run: a, b or a,b")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-directory", type=Path, default=None)
    args = parser.parse_args()
    workflows = set(args.workflows.split(","))
    if not workflows or not workflows <= {"a", "b"}:
        parser.error(f"--workflows takes a, b or a,b, not {args.workflows!r}")
    python = str(REPO / ".venv-comfy" / "bin" / "python")
    base = (args.base_directory or REPO / "outputs" / "comfy_cluster_demo").resolve()
    base.mkdir(parents=True, exist_ok=True)
    out_dir = base / "rank0" / "output"
    stages: list[tuple[str, float]] = []
    t = time.monotonic()

    def stage(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        stages.append((name, now - t))
        t = now
        print(f"  {name:<34} {stages[-1][1]:7.2f} s", flush=True)

    parts = {"a": f"workflow (a) with {args.images} images", "b": "workflow (b) on a photograph"}
    print(
        f"ComfyUI Cluster demo: {args.ranks} ranks, "
        + ", ".join(parts[w] for w in sorted(workflows))
    )
    if not (base / "models" / "diffusion_models" / "tiny_sd15_unet.safetensors").exists():
        subprocess.run(
            [python, str(REPO / "tools/comfyui/make_tiny_sd.py"), str(base / "models")],
            check=True,
            capture_output=True,
        )
    stage("embedded default models")
    photo = stage_photo(base / "input") if "b" in workflows else ""
    log_path = base / "cluster.log"
    config = ComfyClusterConfig(
        nproc=args.ranks,
        port=args.port,
        base_directory=str(base),
        python=python,
        backend="udp",
        extra_custom_nodes=[str(REPO / "tools/comfyui/test_nodes")],
    )
    images: list[Path] = []
    sheets: list[Path] = []
    with log_path.open("w", buffering=1) as log:
        cluster = start_comfy_cluster(config, stdout=log)
        try:
            cluster.wait_ready()
            stage(f"start {args.ranks} ComfyUI servers")
            leader = ComfyClient(cluster.leader_url, timeout=60)
            while leader.get_json("/cluster/status").get("state") != "ready":
                time.sleep(0.2)
            stage("cluster formed (rendezvous)")
            if "a" in workflows:
                entry = leader.wait(leader.queue_prompt(workflow_a(args.images)), timeout=900)
                stage("workflow (a) queued -> done")
                print(f"    of which executing on the leader   {executing_s(entry):7.2f} s")
                images = saved_paths(entry, "9", out_dir)
            if "b" in workflows:
                entry = leader.wait(leader.queue_prompt(workflow_b(photo)), timeout=900)
                stage("workflow (b) queued -> done")
                print(f"    of which executing on the leader   {executing_s(entry):7.2f} s")
                sheets = saved_paths(entry, SAVE_NODE, out_dir)
        finally:
            cluster.stop()
    print(f"  {'total':<34} {sum(s for _, s in stages):7.2f} s")
    print(f"server logs: {log_path}")
    if "a" in workflows:
        print(f"workflow (a): {len(images)} images saved by the leader:")
        for path in images:
            print(f"  {path}")
    if "b" in workflows:
        # The last line: scripts/main.sh ends with it, so the sheet is easy to find.
        print(f"workflow (b): {len(LOOKS)} looks, row by row: {', '.join(LOOKS)}")
        print(f"contact sheet: {sheets[0] if sheets else 'NOT SAVED'}")
    ok_a = "a" not in workflows or len(images) == args.images
    ok_b = "b" not in workflows or len(sheets) == 1
    return 0 if ok_a and ok_b else 1


if __name__ == "__main__":
    raise SystemExit(main())
