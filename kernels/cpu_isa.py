"""Which x86 vector ISA this CPU runs, in ATen's CPU_CAPABILITY names.

Standard library only: setup.py loads this file to pick the ISA that csrc/ is
compiled for, and kernels/cpu_op.py checks at import that the running CPU has
it (a library built with AVX-512 dies with SIGILL on a CPU without it, before
any Python error could be raised).
"""

import os
import platform

# Best last. AVX512_BF16 is ATen's AVX512 plus the bf16 conversion instructions.
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")

# gcc flags per capability; at::vec picks its vector width from CPU_CAPABILITY_*.
COMPILE_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX512_BF16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx512bf16"],
}

# the CPU_CAPABILITY at::vec is compiled with
ATEN_CAPABILITY = {"DEFAULT": "DEFAULT", "AVX2": "AVX2", "AVX512": "AVX512", "AVX512_BF16": "AVX512"}

_REQUIRED_CPU_FLAGS = {
    "DEFAULT": set(),
    "AVX2": {"avx2", "fma", "f16c"},
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
    "AVX512_BF16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c", "avx512_bf16"},
}


def cpu_flags() -> set[str]:
    """Flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported(capability: str, flags: set[str] | None = None) -> bool:
    if capability not in _REQUIRED_CPU_FLAGS:
        raise ValueError(f"unknown CPU capability {capability!r}; expected one of {CAPABILITIES}")
    if capability == "DEFAULT":
        return True
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return _REQUIRED_CPU_FLAGS[capability] <= (cpu_flags() if flags is None else flags)


def build_capability() -> str:
    """The ISA to compile for: $STEERING_VLLM_CPU_ISA, else the best this CPU runs.

    Set STEERING_VLLM_CPU_ISA=AVX2 (or DEFAULT) to build a library that also runs
    on older CPUs than the build machine's.
    """
    forced = os.environ.get("STEERING_VLLM_CPU_ISA", "").upper()
    if forced:
        if forced not in CAPABILITIES:
            raise ValueError(f"STEERING_VLLM_CPU_ISA={forced!r}: expected one of {CAPABILITIES}")
        return forced
    return next(c for c in reversed(CAPABILITIES) if supported(c))
