"""Loads the C++ CPU library built from csrc/.

Loading it defines the `torch.ops.steering.*` schemas and registers their CPU
kernels. setup.py builds one library per vector ISA (kernels/_C_<ISA>, see
kernels/cpu_isa.py); this module loads the best one the running CPU supports,
or the one $STEERING_VLLM_CPU_ISA names. Only one can be loaded in a process:
they register the same ops.
"""

import importlib
import os

from kernels import cpu_isa

_REBUILD_HINT = (
    "Rebuild it with `pip install --no-build-isolation -e .` (STEERING_VLLM_CPU_ISA=AVX2,AVX512 at build time "
    "builds only those variants)."
)


def built_capabilities() -> tuple[str, ...]:
    """The ISAs this install has a library for."""
    try:
        from kernels._build_info import CPU_CAPABILITIES
    except ImportError as e:
        raise ImportError(f"steering-vllm's C++ op is not built. {_REBUILD_HINT}") from e
    return CPU_CAPABILITIES


def load() -> str:
    """Import the chosen kernels._C_<ISA> once; returns its ISA."""
    built = built_capabilities()
    try:
        capability = cpu_isa.choose(built, os.environ.get(cpu_isa.ISA_VARIABLE))
    except ImportError as e:
        raise ImportError(f"{e}. {_REBUILD_HINT}") from None
    importlib.import_module(f"kernels._C_{capability}")
    return capability
