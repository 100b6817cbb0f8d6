"""Loading an image file the way ComfyUI's LoadImage does (same tensors, same mask convention)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from .folders import contained_file, relative_name


def resolve_image_path(name: str, what: str = "ClusterBroadcastLoadedImage") -> Path:
    """The file an image name means to ComfyUI's LoadImage: ``name`` in the input folder, or in
    the output/temp folder with an `` [output]``/`` [temp]`` annotation (``folder_paths``'
    ``get_annotated_filepath``), refused unless it stays inside that folder once symlinks are
    resolved.  Never a raw path."""
    try:
        folder_paths = importlib.import_module("folder_paths")
    except ImportError:
        raise RuntimeError(
            f"{what}: images are loaded from ComfyUI's input folder, and ComfyUI's folder_paths "
            "is not importable here"
        ) from None
    bare, base = folder_paths.annotated_filepath(name.strip())
    folder = Path(base if base is not None else folder_paths.get_input_directory())
    pure = relative_name(str(bare))
    if pure is None:
        raise ValueError(
            f"{what}: {name!r} is not an image name; give a file name in ComfyUI's input folder "
            f"{folder} (optionally annotated [input], [output] or [temp]), not a path"
        )
    file = contained_file(folder, str(bare), what, name, "ComfyUI's folder")
    if not file.is_file():
        raise FileNotFoundError(
            f"{what}: no image {str(pure)!r} in {folder} (on the leader, rank 0)"
        )
    return file


def load_image(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE ``[N, H, W, 3]`` float32 in 0..1 and MASK ``[N, H', W']`` (1 = transparent).

    As LoadImage: EXIF orientation applied, every frame of an animation of the first frame's size
    kept (MPO: first frame only), 16-bit ``I`` images scaled, and a 64x64 zero mask per frame
    when the image has no alpha.
    """
    from PIL import Image, ImageOps, ImageSequence

    with Image.open(path) as img:
        images: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        size: tuple[int, int] | None = None
        for raw in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(raw) or raw
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            if rgb.size != size:
                continue
            images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None,])
            if "A" in frame.getbands():
                alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                mask = 1.0 - torch.from_numpy(alpha)
            elif frame.mode == "P" and "transparency" in frame.info:
                alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
                mask = 1.0 - torch.from_numpy(alpha)
            else:
                mask = torch.zeros((64, 64), dtype=torch.float32)
            masks.append(mask.unsqueeze(0))
        if len(images) > 1 and img.format != "MPO":
            return torch.cat(images, dim=0), torch.cat(masks, dim=0)
        return images[0], masks[0]
