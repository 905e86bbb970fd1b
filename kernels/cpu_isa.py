"""Which x86 vector ISAs the C++ op is built for and which one this CPU runs, in ATen's CPU_CAPABILITY names.

Standard library only: setup.py loads this file to pick the ISAs that csrc/ is
compiled for (one library each, as vLLM ships _C_AVX2 and _C_AVX512), and
kernels/cpu_op.py picks at import the best one the running CPU has (a library
built with AVX-512 dies with SIGILL on a CPU without it, before any Python error
could be raised). STEERING_VLLM_CPU_ISA names the ones to build, and at run time
the one to load.
"""

import os
import platform

ISA_VARIABLE = "STEERING_VLLM_CPU_ISA"

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


def _parse(value: str) -> list[str]:
    names = [v.strip().upper() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CAPABILITIES]
    if unknown:
        raise ValueError(f"{ISA_VARIABLE}={value!r}: {', '.join(unknown)} is not one of {', '.join(CAPABILITIES)}")
    return names


def build_capabilities() -> tuple[str, ...]:
    """The ISAs setup.py compiles csrc/ for, one library each.

    Every variant on x86-64 (a compiler targets any of them on any x86 host, so one build runs on every
    x86 CPU and its tests can cover each variant the test machine runs); only portable code elsewhere.
    $STEERING_VLLM_CPU_ISA (one name or a comma-separated list) builds just those, for a faster build.
    """
    forced = os.environ.get(ISA_VARIABLE, "")
    if forced.strip():
        return tuple(c for c in CAPABILITIES if c in _parse(forced))
    if platform.machine().lower() in ("x86_64", "amd64"):
        return CAPABILITIES
    return ("DEFAULT",)


def choose(built: tuple[str, ...], requested: str | None = None, flags: set[str] | None = None) -> str:
    """The variant to load: `requested` ($STEERING_VLLM_CPU_ISA) if given, else the best built one this CPU runs.

    Raises ImportError naming the problem: a requested ISA that was not built or that this CPU lacks
    (loading it would kill the process with SIGILL before Python could say why).
    """
    if requested and requested.strip():
        names = _parse(requested)
        if len(names) != 1:
            raise ImportError(f"{ISA_VARIABLE}={requested!r}: name one ISA to load, one of {', '.join(built)}")
        name = names[0]
        if name not in built:
            raise ImportError(
                f"{ISA_VARIABLE}={requested}: steering-vllm's C++ op was not built for {name} "
                f"(built: {', '.join(built) or 'none'})"
            )
        if not supported(name, flags):
            raise ImportError(f"{ISA_VARIABLE}={requested}: this CPU does not support {name}")
        return name
    runnable = [c for c in CAPABILITIES if c in built and supported(c, flags)]
    if not runnable:
        raise ImportError(
            f"steering-vllm's C++ op was built for {', '.join(built) or 'no ISA'}, none of which this CPU supports"
        )
    return runnable[-1]
