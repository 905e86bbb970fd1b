"""On the path only under scripts/as_avx2_cpu.sh: torch.cpu reports no AVX-512 and no AMX.

vLLM for CPU picks its library (vllm/_C_AVX2 or _C_AVX512) and some kernels from these
queries, which read the CPU itself and ignore ATEN_CPU_CAPABILITY. torch.cpu is patched
when it is first imported, so processes that never import torch pay nothing.
"""

import importlib.abc
import importlib.util
import sys

_FALSE = ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported")
_FALSE += ("_is_amx_tile_supported", "_is_amx_fp16_supported")


class _AVX2OnlyTorchCpu(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.cpu":
            return None
        sys.meta_path.remove(self)  # find the real module below, once
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            for name in _FALSE:
                if hasattr(module, name):
                    setattr(module, name, lambda: False)

        spec.loader.exec_module = exec_then_patch
        return spec


sys.meta_path.insert(0, _AVX2OnlyTorchCpu())
