"""SteeredRMSNorm, the layer the plugin puts into vLLM's models, against the float64 reference (no engine)."""

import pytest
import torch

from kernels import fused_add_steer_rms_norm_reference


@pytest.fixture(scope="module")
def norm_classes():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    from steering_vllm.engine.norm import SteeredRMSNorm

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


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_steered_gemma_norm_multiplies_by_one_plus_weight(norm_classes, dtype, atol):
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm

    from steering_vllm.engine.norm import SteeredGemmaRMSNorm, steered_norm

    d = 96
    base = GemmaRMSNorm(d, eps=1e-6)
    with torch.no_grad():
        base.weight.copy_(0.3 * torch.randn(d))  # stored w; the norm multiplies by 1 + w
    base = base.to(dtype)
    norm = steered_norm(base, "model.norm", steered_layer=2)
    assert type(norm) is SteeredGemmaRMSNorm and norm.weight is base.weight
    norm.steering_table.copy_(torch.randn(1, d))
    hidden, residual = torch.randn(5, d, dtype=dtype), torch.randn(5, d, dtype=dtype)
    y_ref, r_ref = fused_add_steer_rms_norm_reference(
        hidden.double(), residual.double(), norm.steering_table.double(), None, norm.weight.double(), 1e-6, 1.0
    )
    y, r = norm(hidden, residual)
    torch.testing.assert_close(r.double(), r_ref, atol=atol, rtol=0)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=atol)
    x = torch.randn(3, d, dtype=dtype)
    torch.testing.assert_close(norm(x.clone()), base(x.clone()))  # no residual: vLLM's own norm


def test_a_norm_the_mechanism_does_not_know_is_refused(norm_classes):
    from vllm.model_executor.layers.layernorm import LayerNorm

    from steering_vllm.engine.norm import steered_norm

    with pytest.raises(NotImplementedError, match=r"model\.layers\.3\.input_layernorm is LayerNorm, not one of"):
        steered_norm(LayerNorm(64), "model.layers.3.input_layernorm", steered_layer=2)
