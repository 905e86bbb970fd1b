"""SteeredRMSNorm, the layer the plugin puts into vLLM's models, against the float64 reference (no engine)."""

import pytest
import torch

from kernels import fused_add_steer_rms_norm_reference


@pytest.fixture(scope="module")
def norm_classes():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    from steering_vllm.norm import SteeredRMSNorm

    with set_current_vllm_config(VllmConfig()):
        yield RMSNorm, SteeredRMSNorm


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_steered_norm_adds_its_vector_in_place(norm_classes, dtype, atol):
    RMSNorm, SteeredRMSNorm = norm_classes
    d = 96
    base = RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d))
    base = base.to(dtype)
    norm = SteeredRMSNorm.replacing(base, steered_layer=3)
    assert norm.weight is base.weight and norm.steered_layer == 3
    assert "steering_table" not in norm.state_dict()  # weight loaders never see it
    norm.steering_table.copy_(torch.randn(1, d))
    hidden, residual = torch.randn(5, d, dtype=dtype), torch.randn(5, d, dtype=dtype)
    y_ref, r_ref = fused_add_steer_rms_norm_reference(
        hidden.double(), residual.double(), norm.steering_table.double(), None, norm.weight.double(), 1e-6
    )
    y, r = norm(hidden, residual)
    assert y.data_ptr() == hidden.data_ptr() and r.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(r.double(), r_ref, atol=atol, rtol=0)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=atol)


def test_without_residual_it_is_vllms_norm(norm_classes):
    RMSNorm, SteeredRMSNorm = norm_classes
    base = RMSNorm(64, eps=1e-6)
    norm = SteeredRMSNorm.replacing(base, steered_layer=0)
    norm.steering_table.fill_(1.0)  # not used without a residual: the embeddings are never steered
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x.clone()), base(x.clone()))
