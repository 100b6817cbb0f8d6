#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.  Idempotent and offline-friendly:
# torch is pinned to the local CPU wheel so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.setup-stamp
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -e '.[torch,mpi,compression,images,bench,server,dev]' mpich
  touch "$STAMP"
elif [ setup.py -nt "$STAMP" ] || [ -n "$(find collectives/transport collectives/_compiled.py -maxdepth 1 -name '*.py' -newer "$STAMP")" ]; then
  # A source of the compiled transport core changed (collectives/_compiled.py): rebuild it, or
  # the package runs that source, slower, with a warning.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  touch "$STAMP"
fi
.venv/bin/python -c "import collectives, torch, mpi4py; print('setup ok: torch', torch.__version__, '| mpi4py', mpi4py.__version__, '| backends', collectives.available_backends(), '| transport', collectives._compiled.status()['mode'])"
