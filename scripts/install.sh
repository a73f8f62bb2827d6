#!/usr/bin/env bash
# The one install recipe, used by `make setup` (and so by CI) and by the Dockerfile.
# Usage: scripts/install.sh PYTHON [EXTRAS]   e.g. scripts/install.sh .venv/bin/python dev
# torch goes first and pinned: an unpinned or ranged torch resolves to the multi-GB CUDA build.
# TORCH_INDEX_URL (optional) points pip at a CPU wheel index, e.g. in a Docker build:
#   https://download.pytorch.org/whl/cpu
set -euo pipefail
py=${1:?usage: install.sh PYTHON [EXTRAS]}
extras=${2:-}
index_args=()
[ -n "${TORCH_INDEX_URL:-}" ] && index_args=(--extra-index-url "$TORCH_INDEX_URL")
"$py" -m pip install -q "${index_args[@]}" torch==2.13.0
if [ -n "$extras" ]; then
  "$py" -m pip install -q -e ".[$extras]"
else
  "$py" -m pip install -q .
fi
# wrk: the load client of `benchmarks load` / `ceiling` (C, so the client is not the bottleneck).
# A Debian package; installed where apt exists and we may use it, otherwise say what to do.
if ! command -v wrk >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
    { $sudo apt-get install -y -q wrk >/dev/null 2>&1 || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q wrk >/dev/null; }; } ||
      echo "install.sh: apt-get install wrk failed; benchmarks load/ceiling need it" >&2
  else
    echo "install.sh: wrk not found; install it (apt-get install wrk) for benchmarks load/ceiling" >&2
  fi
fi
