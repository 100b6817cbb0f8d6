"""Workflow (b): eight looks of a real photograph, finished on the ranks, on one contact sheet.

Used by ``examples/comfy_cluster_demo.py`` (``--workflows b`` runs it alone) and by
``tests/comfy_e2e/test_photo_demo.py``.  The photograph is Grace Hopper's portrait that matplotlib
ships (``mpl-data/sample_data/grace_hopper.jpg``, 512x600), so nothing is downloaded.

    LoadImage -> ImageScale (256x300) -> 8 looks, core nodes:
        as is, ImageInvert, ImageFlip, ImageQuantize, ImageBlur, Morphology (gradient),
        ImageRGBToYUV (luma), ImageBlend (screen, with the mirror image)
    -> ImageBatch x7 -> ClusterFanOutImage
    -> every rank, on its share: ImageScaleBy (2x lanczos) -> ImageSharpen
    -> ClusterFanInImages -> RebatchImages (1) -> ImageGrid (4 columns) -> SaveImage

Every node but the two cluster nodes is ComfyUI core (0.3.75).  The looks are made before the
fan-out because a node applies one operation to its whole batch: what differs per item must
already be in the items; the ranks then do the same finishing work on their share.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

PHOTO = "grace_hopper.jpg"
THUMB = (256, 300)  # half the photo's size: the ranks' 2x upscale brings it back to 512x600
SCALE = 2
COLUMNS = 4
PADDING = 8  # black gutter between cells (ImageGrid's padding)
LOOKS = (
    "as is",
    "negative",
    "mirror",
    "posterised",
    "soft focus",
    "edges",
    "luma",
    "double exposure",
)
SAVE_NODE = "b9"
SHEET_PREFIX = "cluster_demo/photo_contact_sheet"


def sample_photo() -> Path:
    """The photograph inside the installed matplotlib package (no download)."""
    try:
        from matplotlib import cbook
    except ImportError as exc:
        raise SystemExit(
            "the photo demo needs matplotlib for its sample photograph: "
            "pip install -e '.[bench]' (scripts/setup.sh does)"
        ) from exc
    path = Path(cbook.get_sample_data(PHOTO, asfileobj=False))
    if not path.is_file():
        raise SystemExit(f"matplotlib has no {PHOTO} at {path}")
    return path


def stage_photo(input_dir: Path) -> str:
    """Copy the photograph into a ComfyUI input folder; returns the name LoadImage takes.

    Every rank's LoadImage runs and is validated, the followers' too (nodes feeding a fan-out
    run everywhere, their values ignored off the leader), so every rank must see the file: the
    ranks of one ``--base-directory`` share its ``input/``.  Across machines each rank needs its
    own copy, or use ClusterBroadcastLoadedImage.
    """
    input_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample_photo(), input_dir / PHOTO)
    return PHOTO


def cell_size() -> tuple[int, int]:
    return THUMB[0] * SCALE, THUMB[1] * SCALE


def sheet_size(looks: int = len(LOOKS)) -> tuple[int, int]:
    """(width, height) of the contact sheet ImageGrid makes for ``looks`` cells."""
    w, h = cell_size()
    rows = -(-looks // COLUMNS)
    return COLUMNS * w + (COLUMNS - 1) * PADDING, rows * h + (rows - 1) * PADDING


def cell_box(index: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of cell ``index`` on the sheet (row-major)."""
    w, h = cell_size()
    left = (index % COLUMNS) * (w + PADDING)
    top = (index // COLUMNS) * (h + PADDING)
    return left, top, left + w, top + h


def workflow_b(photo: str = PHOTO, cluster: bool = True) -> dict[str, dict[str, Any]]:
    """The API-format prompt; ``cluster=False`` is the same work on one instance, for checks."""

    def node(class_type: str, **inputs: Any) -> dict[str, Any]:
        return {"class_type": class_type, "inputs": inputs}

    base = ["b2", 0]
    wf: dict[str, dict[str, Any]] = {
        "b1": node("LoadImage", image=photo),
        "b2": node("ImageScale", image=["b1", 0], upscale_method="area", width=THUMB[0],
                   height=THUMB[1], crop="disabled"),
        "v1": node("ImageInvert", image=base),
        "v2": node("ImageFlip", image=base, flip_method="y-axis: horizontally"),
        "v3": node("ImageQuantize", image=base, colors=6, dither="bayer-4"),
        "v4": node("ImageBlur", image=base, blur_radius=8, sigma=4.0),
        "v5": node("Morphology", image=base, operation="gradient", kernel_size=5),
        "v6": node("ImageRGBToYUV", image=base),
        "v7": node("ImageBlend", image1=base, image2=["v2", 0], blend_factor=0.6,
                   blend_mode="screen"),
    }  # fmt: skip
    # ImageBatch takes two images: chain it, in LOOKS order (the grid's reading order).
    batch = base
    for i in range(1, len(LOOKS)):
        wf[f"batch{i}"] = node("ImageBatch", image1=batch, image2=[f"v{i}", 0])
        batch = [f"batch{i}", 0]
    if cluster:
        wf["b3"] = node("ClusterFanOutImage", image=batch)
        batch = ["b3", 0]
    wf["b4"] = node("ImageScaleBy", image=batch, upscale_method="lanczos", scale_by=float(SCALE))
    wf["b5"] = node("ImageSharpen", image=["b4", 0], sharpen_radius=2, sigma=1.0, alpha=0.6)
    finished = ["b5", 0]
    if cluster:
        wf["b6"] = node("ClusterFanInImages", images=finished)
        finished = ["b6", 0]
    wf["b7"] = node("RebatchImages", images=finished, batch_size=1)
    width, height = cell_size()
    wf["b8"] = node(
        "ImageGrid",
        images=["b7", 0],
        columns=COLUMNS,
        cell_width=width,
        cell_height=height,
        padding=PADDING,
    )
    wf[SAVE_NODE] = node("SaveImage", images=["b8", 0], filename_prefix=SHEET_PREFIX)
    return wf
