"""Freeing memory: now (between two steps of a workflow) or once the workflow has finished.

Each rank frees its own memory: the same workflow runs on every rank, so every rank reaches the
node; no message is needed.  ComfyUI's own helpers are used when ComfyUI is present.
"""

from __future__ import annotations

import gc
import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)


def _model_management() -> ModuleType | None:
    try:
        return importlib.import_module("comfy.model_management")
    except ImportError:
        return None


def free_now(unload_models: bool = False) -> list[str]:
    """Collect garbage and return cached allocator memory to the device; say what was done."""
    done = [f"gc collected {gc.collect()} objects"]
    from . import recycled

    released = recycled.release_idle()  # after the collection: it may have ended some uses
    if released:
        done.append(f"unmapped {released / 1e6:.0f} MB of idle recycled batches")
    mm = _model_management()
    if mm is not None:
        if unload_models:
            mm.unload_all_models()
            done.append("unloaded all models")
        mm.soft_empty_cache()
        done.append("comfy soft_empty_cache")
    else:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            done.append("torch.cuda.empty_cache")
    log.debug("free_now: %s", ", ".join(done))
    return done


def free_when_finished() -> list[str]:
    """Ask ComfyUI's prompt worker to unload models and free memory after the current prompt.

    Outside a ComfyUI server there is no "after": memory is freed now instead.
    """
    try:
        server = importlib.import_module("server")
    except ImportError:
        return ["no ComfyUI server: freeing now", *free_now()]
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    queue = getattr(instance, "prompt_queue", None)
    if queue is None:
        return ["ComfyUI server not started: freeing now", *free_now()]
    queue.set_flag("unload_models", True)
    queue.set_flag("free_memory", True)
    return ["models unloaded and memory freed when the prompt finishes"]
