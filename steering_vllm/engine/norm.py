"""vLLM's norms with a steering vector folded into their residual add (DESIGN.md §2).

vLLM keeps a layer's output as (hidden, residual) and defers their sum into the next norm, so the vector of
layer l lives in the norm that consumes layer l's output: layer l+1's input norm, or the final norm. Two norm
classes do that add in the steered families: ``RMSNorm`` (``* weight``) and Gemma's ``GemmaRMSNorm`` (stores
``w``, multiplies by ``1 + w`` in fp32); the same op serves both, with ``weight_offset`` 0 or 1.
"""

import torch
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm

import kernels  # noqa: F401  (registers torch.ops.steering)


class SteeringBuffers:
    """``residual <- hidden + residual + s_l``; ``hidden <- norm(residual)``, in place, one kernel.

    ``steering_table`` is a [rows, hidden_size] float32 buffer: one row (every token reads row 0) unless the
    engine serves per-request steering, where ``steering_index`` (an int32 buffer shared by all the model's
    steered norms, filled before each forward) names each token's row. Neither is part of the state dict,
    so weight loaders (including the dummy one) never touch them, and both are only ever updated in place,
    so compiled graphs and CUDA graphs that captured their addresses stay valid.
    """

    WEIGHT_OFFSET = 0.0  # y = rmsnorm(x) * (WEIGHT_OFFSET + weight)

    def __init__(self, hidden_size: int, eps: float, steered_layer: int, rows: int = 1, index=None):
        super().__init__(hidden_size, eps=eps)  # the vLLM norm class mixed in after this one
        self.steered_layer = steered_layer
        self.register_buffer("steering_table", torch.zeros(rows, hidden_size, dtype=torch.float32), persistent=False)
        self.register_buffer("steering_index", index, persistent=False)

    @classmethod
    def replacing(cls, norm, steered_layer: int, rows: int = 1, index=None):
        """A steered norm that takes over ``norm``'s weight (same Parameter, so weight loading is unchanged)."""
        steered = cls(norm.weight.shape[0], norm.variance_epsilon, steered_layer, rows, index)
        steered.weight = norm.weight
        return steered

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return super().forward(x)
        index = None if self.steering_index is None else self.steering_index[: x.shape[0]]
        torch.ops.steering.fused_add_steer_rms_norm_(
            x, residual, self.steering_table, index, self.weight, self.variance_epsilon, self.WEIGHT_OFFSET
        )
        return x, residual

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, steered_layer={self.steered_layer}"


class SteeredRMSNorm(SteeringBuffers, RMSNorm):
    @classmethod
    def replacing(cls, norm: RMSNorm, steered_layer: int, rows: int = 1, index=None) -> "SteeredRMSNorm":
        if norm.variance_size_override is not None or not norm.has_weight:
            raise NotImplementedError("steering supports plain RMSNorm with a weight over the full hidden size")
        return super().replacing(norm, steered_layer, rows, index)


class SteeredGemmaRMSNorm(SteeringBuffers, GemmaRMSNorm):
    WEIGHT_OFFSET = 1.0


# vLLM norm class -> its steered form; the mechanism's one assumption about a family (DESIGN.md §2)
STEERED_NORMS = {RMSNorm: SteeredRMSNorm, GemmaRMSNorm: SteeredGemmaRMSNorm}


def steered_norm(norm, name: str, steered_layer: int, rows: int = 1, index=None) -> SteeringBuffers:
    """``norm`` (module ``name``) replaced by its steered form, which takes over its weight Parameter."""
    steered_class = next((steered for base, steered in STEERED_NORMS.items() if isinstance(norm, base)), None)
    if steered_class is None or isinstance(norm, SteeringBuffers):
        known = ", ".join(cls.__name__ for cls in STEERED_NORMS)
        raise NotImplementedError(
            f"steering: {name} is {type(norm).__name__}, not one of vLLM's norms it steers ({known}); this model's "
            "layers do not have the shape the steering mechanism needs (DESIGN.md §2)"
        )
    return steered_class.replacing(norm, steered_layer, rows, index)
