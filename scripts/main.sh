#!/usr/bin/env bash
# The main job: set up everything, run the plain library on 4 ranks on each backend, then start a
# 4-rank ComfyUI cluster on the embedded default (tiny generated SD weights, CPU) and queue two
# workflows on the leader: (a) txt2img, printing where the 8 images are, and (b) eight looks of a
# photograph on a contact sheet.  The ComfyUI demo runs last so that its last line, the contact
# sheet's path, is the last thing printed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tools/comfyui/install.sh
echo "== the collectives library alone: 4 ranks, scatter / blur / gather =="
.venv/bin/mpiexec -n 4 .venv/bin/python examples/demo.py --backend mpi
.venv/bin/comfycluster-launch --nproc 4 -- .venv/bin/python examples/demo.py  # udp, the default
.venv/bin/comfycluster-launch --nproc 4 --backend gloo -- .venv/bin/python examples/demo.py
echo "== ComfyUI: a 4-rank cluster runs workflows (a) and (b) =="
.venv/bin/python examples/comfy_cluster_demo.py --ranks 4 --images 8 "$@"
