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
