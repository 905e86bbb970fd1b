"""vLLM's RMSNorm with a steering vector folded into its residual add (DESIGN.md §2).

vLLM keeps a layer's output as (hidden, residual) and defers their sum into the next norm, so the vector of
layer l lives in the norm that consumes layer l's output: layer l+1's input norm, or the final norm.
"""

import torch
from vllm.model_executor.layers.layernorm import RMSNorm

import kernels  # noqa: F401  (registers torch.ops.steering)


class SteeredRMSNorm(RMSNorm):
    """``residual <- hidden + residual + s_l``; ``hidden <- rmsnorm(residual) * weight``, in place, one kernel.

    ``steering_table`` is a [1, hidden_size] float32 buffer. It is not part of the state dict, so weight
    loaders (including the dummy one) never touch it, and it is only ever updated in place, so compiled
    graphs and CUDA graphs that captured its address stay valid.
    """

    def __init__(self, hidden_size: int, eps: float, steered_layer: int):
        super().__init__(hidden_size, eps=eps)
        self.steered_layer = steered_layer
        self.register_buffer("steering_table", torch.zeros(1, hidden_size, dtype=torch.float32), persistent=False)

    @classmethod
    def replacing(cls, norm: RMSNorm, steered_layer: int) -> "SteeredRMSNorm":
        """A steered norm that takes over ``norm``'s weight (same Parameter, so weight loading is unchanged)."""
        if norm.variance_size_override is not None or not norm.has_weight:
            raise NotImplementedError("steering supports plain RMSNorm with a weight over the full hidden size")
        steered = cls(norm.hidden_size, norm.variance_epsilon, steered_layer)
        steered.weight = norm.weight
        return steered

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return super().forward(x)
        torch.ops.steering.fused_add_steer_rms_norm_(
            x, residual, self.steering_table, None, self.weight, self.variance_epsilon
        )
        return x, residual

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, steered_layer={self.steered_layer}"
