#!/usr/bin/env bash
# Runs a command the way it runs on an x86-64 CPU with AVX2 but no AVX-512 (an AMD EPYC of the
# Zen 2/3 kind, most laptops), on a machine that has AVX-512: every library that picks its code by
# CPU is told to pick its AVX2 code. An AVX-512 CPU runs AVX2 code, so this is the real AVX2 code
# path, on this machine's timing.
#
#   scripts/as_avx2_cpu.sh .venv/bin/python -m pytest        # the test suite as on an AVX2-only CPU
#
# steering-vllm's op:  STEERING_VLLM_CPU_ISA=AVX2 loads kernels/_C_AVX2
# torch's own kernels: ATEN_CPU_CAPABILITY=avx2;  MKL (BLAS): MKL_ENABLE_INSTRUCTIONS=AVX2;  oneDNN: ONEDNN_MAX_CPU_ISA=AVX2
# torch.compile:       TORCHINDUCTOR_CPP_MARCH=x86-64-v3 (AVX2, FMA, F16C) in place of -march=native, whose AVX-512
#                      macros next to the AVX2 code inductor picks give wrong results (half of each bf16 vector)
# vLLM's ops:          it loads vllm/_C_AVX2 when torch.cpu says "no AVX-512", which avx2_only/sitecustomize.py
#                      makes it say in every Python process the command starts
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export STEERING_VLLM_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
export TORCHINDUCTOR_CPP_MARCH=x86-64-v3
export PYTHONPATH="$here/avx2_only${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
