#!/usr/bin/env bash
# Bundle into .gpu/ what scripts/gpu_bench.sh needs on the CUDA machine, from the project root:
#   bash scripts/gpu_prepare.sh        (then `run` with carry [".gpu"]: source .gpu/env.sh && bash scripts/gpu_bench.sh)
# ../shared/gpu/prepare.sh bundles the web stack and the NLP pins; the CUDA image (see ../shared/gpu/README.md)
# also lacks what this project imports since: msgpack (the engine link, service/protocol.py), orjson (responses,
# wrk result parsing), psutil (the client's and server's CPU shares), uvloop + httptools (uvicorn's fast loop and
# parser, as on CPU), datasets with its own imports (the study's chunked map in recipe-compare), annotated-doc
# (fastapi's, since 0.12x) and regex (transformers 4.57's; the image's transformers 5 may bring another). Versions
# are read from .venv, so the GPU runs the code paths the CPU tests ran. gpu_bench.sh's preflight step checks
# every import first and stops at once, with the missing names, rather than after minutes of device time.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
GPU_EXTRA_PKGS="msgpack orjson psutil uvloop httptools datasets dill multiprocess xxhash fsspec requests urllib3
  charset-normalizer idna certifi annotated-doc regex ${GPU_EXTRA_PKGS:-}" bash ../shared/gpu/prepare.sh
