"""Plain-torch reference of the op: the specification the kernels are tested against.

Runs in the dtype it is given (promoted to at least float32): pass float64
tensors for a reference to test against, and use torch autograd through it for
the gradients.
"""

import torch


def fused_add_steer_rms_norm_reference(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    table: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden, residual: [..., d]; table: [R, d]; index: [...] rows of table or None (row 0).

    Returns (y, residual_out) in hidden's dtype:
        residual_out = hidden + residual + table[index]
        y = residual_out * rsqrt(mean(residual_out^2) + eps) * (weight_offset + weight)
    """
    compute = torch.promote_types(hidden.dtype, torch.float32)
    steer = table[0] if index is None else table[index]
    x = hidden.to(compute) + residual.to(compute) + steer.to(compute)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (weight_offset + weight.to(compute))
    return y.to(hidden.dtype), x.to(residual.dtype)
