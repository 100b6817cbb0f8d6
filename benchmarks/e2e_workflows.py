"""The API-format workflows the end-to-end benchmark queues on the leader.

ComfyUI caches a node's output while its inputs (and theirs) stay the same, so a second run of
an unchanged plain workflow would run nothing at all.  The image builders take a ``nonce``, added
(in units of 1e-9 s) to SleepPerImage's ``seconds_per_image``: every prompt is new to the cache
from that node on, at a cost of nanoseconds per image.  Nodes upstream of it (IndexedImages, the
model loaders) stay cached across the prompts of one measurement, in the cluster and the plain
variant alike: the benchmark times what the cluster adds, not making test images or loading
models.  Cluster nodes are never cached (they are not idempotent), so everything after a
fan-out runs every time anyway.
"""

from __future__ import annotations

from typing import Any

Workflow = dict[str, dict[str, Any]]
NONCE_SECONDS = 1e-9


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def _sleep(images: list[Any], seconds: float, nonce: int) -> dict[str, Any]:
    return _node("SleepPerImage", images=images, seconds_per_image=seconds + nonce * NONCE_SECONDS)


def images_workflow(
    *, cluster: bool, images: int, size: int, sleep: float, nonce: int, name: str
) -> Workflow:
    """IndexedImages -> [ClusterFanOutImage] -> SleepPerImage -> [ClusterFanInImages] -> SaveTensor.

    Without ``cluster`` the same chain minus the two cluster nodes: what one instance does.
    """
    source = ["1", 0]
    wf: Workflow = {"1": _node("IndexedImages", batch=images, size=size, dtype="float32")}
    if cluster:
        wf["2"] = _node("ClusterFanOutImage", image=source)
        source = ["2", 0]
    wf["3"] = _sleep(source, sleep, nonce)
    source = ["3", 0]
    if cluster:
        wf["4"] = _node("ClusterFanInImages", images=source)
        source = ["4", 0]
    wf["5"] = _node("SaveTensor", value=source, name=name)
    return wf


def cluster_info_workflow() -> Workflow:
    """One ClusterInfo node: a cluster prompt that moves no data (its round trip is the fixed
    cost of a cluster prompt: rewrite, hand-over to every follower, start and end syncs)."""
    return {"1": _node("ClusterInfo")}


def minimal_plain_workflow(*, nonce: int, name: str) -> Workflow:
    """The smallest plain prompt that runs a node every time: a 1x1 image saved."""
    return images_workflow(cluster=False, images=1, size=1, sleep=0.0, nonce=nonce, name=name)


def ksampler_workflow(
    *, cluster: bool, images: int, size: int, steps: int, prefix: str
) -> Workflow:
    """The tiny-model txt2img of the end-to-end tests (workflow a), batch ``images``.

    EmptyLatentImage -> [ClusterFanOutLatent] -> KSampler -> VAEDecode -> [ClusterFanInImages]
    -> SaveImage.  With ``cluster`` the KSampler always runs (it follows a cluster node); without
    it, a second identical prompt would be served from the cache.
    """
    latent = ["10", 0] if cluster else ["3", 0]
    decoded = ["11", 0] if cluster else ["6", 0]
    wf: Workflow = {
        "1": _node("UNETLoader", unet_name="tiny_sd15_unet.safetensors", weight_dtype="default"),
        "2": _node("ZeroConditioning", tokens=77, width=768),
        "3": _node("EmptyLatentImage", width=size, height=size, batch_size=images),
        "4": _node("KSampler", model=["1", 0], seed=42, steps=steps, cfg=2.0,
                   sampler_name="euler", scheduler="normal", positive=["2", 0],
                   negative=["2", 0], latent_image=latent, denoise=1.0),
        "5": _node("VAELoader", vae_name="taesd"),
        "6": _node("VAEDecode", samples=["4", 0], vae=["5", 0]),
        "7": _node("SaveImage", images=decoded, filename_prefix=prefix),
    }  # fmt: skip
    if cluster:
        wf["10"] = _node("ClusterFanOutLatent", samples=["3", 0])
        wf["11"] = _node("ClusterFanInImages", images=["6", 0])
    return wf


def upstream_workflow(
    *, images: int, size: int, steps: int, sleep: float, nonce: int, name: str
) -> Workflow:
    """A generation on the leader feeding a fan-out, the pattern of "generate, then spread the
    per-image work": EmptyLatentImage -> KSampler -> VAEDecode -> ClusterFanOutImage ->
    SleepPerImage -> ClusterFanInImages -> SaveTensor.

    The seed is the nonce, so every prompt generates anew (a user's next seed).  The fan-out's
    input is lazy: followers do not run the generation, so N ranks should take the generation
    (serial, on the leader) plus 1/N of the sleep.
    """
    return {
        "1": _node("UNETLoader", unet_name="tiny_sd15_unet.safetensors", weight_dtype="default"),
        "2": _node("ZeroConditioning", tokens=77, width=768),
        "3": _node("EmptyLatentImage", width=size, height=size, batch_size=images),
        "4": _node("KSampler", model=["1", 0], seed=nonce, steps=steps, cfg=2.0,
                   sampler_name="euler", scheduler="normal", positive=["2", 0],
                   negative=["2", 0], latent_image=["3", 0], denoise=1.0),
        "5": _node("VAELoader", vae_name="taesd"),
        "6": _node("VAEDecode", samples=["4", 0], vae=["5", 0]),
        "7": _node("ClusterFanOutImage", image=["6", 0]),
        "8": _sleep(["7", 0], sleep, 0),
        "9": _node("ClusterFanInImages", images=["8", 0]),
        "10": _node("SaveTensor", value=["9", 0], name=name),
    }  # fmt: skip


__all__ = [
    "NONCE_SECONDS",
    "Workflow",
    "cluster_info_workflow",
    "images_workflow",
    "ksampler_workflow",
    "minimal_plain_workflow",
    "upstream_workflow",
]
