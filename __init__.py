"""ComfyUI entry point: this repository is a ComfyUI custom-node package.

Clone it into ``ComfyUI/custom_nodes/`` (or point ComfyUI's extra paths at its parent).  All code
lives in the ``comfy_nodes`` and ``collectives`` packages beside this file; importing them starts
no thread or socket.  They are imported by absolute name so that ComfyUI, the cluster server hooks
and tests all share one module instance (and so one communicator).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    try:
        import collectives  # noqa: F401  (installed with pip: nothing to do)
    except ImportError:
        sys.path.insert(0, _HERE)

from comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402


def _install_into_running_comfyui() -> None:
    # Inside ComfyUI, PromptServer.instance exists by the time custom nodes load.  install()
    # only registers handlers and routes; the cluster is joined when the server starts.
    try:
        import server as comfy_server  # ComfyUI's own module
    except ImportError:
        return
    instance = getattr(getattr(comfy_server, "PromptServer", None), "instance", None)
    if instance is not None:
        from comfy_nodes.server.integration import install

        install(instance)


_install_into_running_comfyui()

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
