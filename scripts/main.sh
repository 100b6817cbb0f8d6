#!/usr/bin/env bash
# The main job: set up everything, then start a 4-rank ComfyUI cluster on the embedded default
# (tiny generated SD weights, CPU), queue workflow (a) on the leader, print where the 8 images
# are and the time of each stage.  Then a 4-rank run of the plain library on each backend.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tools/comfyui/install.sh
.venv/bin/python examples/comfy_cluster_demo.py --ranks 4 --images 8 "$@"
echo "== the collectives library alone: 4 ranks, scatter / blur / gather =="
.venv/bin/mpiexec -n 4 .venv/bin/python examples/demo.py --backend mpi
.venv/bin/python -m launchers --nproc 4 -- .venv/bin/python examples/demo.py  # udp, the default
.venv/bin/python -m launchers --nproc 4 --backend gloo -- .venv/bin/python examples/demo.py
