"""The fused residual add + steering bias + RMSNorm op (Triton on CUDA, C++ on CPU).

Not Hugging Face's `kernels` package: this one has no __version__, and
transformers, which probes for that name, treats it as absent (tested).
"""

from kernels.fused_add_steer_rms_norm import fused_add_steer_rms_norm, fused_add_steer_rms_norm_
from kernels.reference import fused_add_steer_rms_norm_reference

__all__ = ["fused_add_steer_rms_norm", "fused_add_steer_rms_norm_", "fused_add_steer_rms_norm_reference"]
