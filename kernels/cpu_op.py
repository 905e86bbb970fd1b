"""Loads the C++ CPU library built from csrc/.

Loading it defines the `torch.ops.steering.*` schemas and registers their CPU
kernels. The library is compiled for one vector ISA (see kernels/cpu_isa.py);
this module refuses to load it on a CPU that lacks that ISA.
"""

import importlib

from kernels import cpu_isa

_REBUILD_HINT = (
    "Rebuild it with `pip install --no-build-isolation -e .` (set STEERING_VLLM_CPU_ISA=AVX2 or DEFAULT "
    "to target older CPUs)."
)


def load() -> str:
    """Import kernels._C once; returns the ISA it was built for."""
    try:
        from kernels._build_info import CPU_CAPABILITY
    except ImportError as e:
        raise ImportError(f"steering-vllm's C++ op is not built. {_REBUILD_HINT}") from e
    if not cpu_isa.supported(CPU_CAPABILITY):
        raise ImportError(
            f"steering-vllm's C++ op was built for {CPU_CAPABILITY}, which this CPU does not support. {_REBUILD_HINT}"
        )
    importlib.import_module("kernels._C")
    return CPU_CAPABILITY
