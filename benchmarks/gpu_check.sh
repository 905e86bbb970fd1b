#!/usr/bin/env bash
# The GPU check of the fused op (benchmarks/gpu_check.py) on a CUDA machine with
# torch and Triton installed: builds this package against that torch, then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-build-isolation --no-deps -e .
PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check "$@"
