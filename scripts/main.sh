#!/usr/bin/env bash
# The main job: set up, then run a 4-rank cluster doing real work on the embedded default
# (a batch of images fanned out, processed on each rank, fanned back in), on every backend.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
for backend in mpi gloo local; do
  echo "== 4-rank demo on backend '$backend' =="
  case $backend in
    mpi)  .venv/bin/mpiexec -n 4 .venv/bin/python examples/demo.py --backend mpi ;;
    gloo) .venv/bin/comfycluster-launch --nproc 4 --backend gloo -- .venv/bin/python examples/demo.py ;;
    local) .venv/bin/python examples/demo.py --backend local --local-ranks 4 ;;
  esac
done
