"""The learner's steered forward (fused op, vLLM-style residual carry) against HF forward hooks in float64."""

import pytest
import torch
from hooked_reference import check_against_hooks, hooked_logprobs
from tiny_models import FAMILIES
from transformers import AutoModelForCausalLM

from trainer.learner import SteeredLearner


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_logprobs_and_gradient_match_the_hooked_hf_model(tiny_model_dirs, family, checkpointing):
    # the MoE experts' default kernel (grouped_mm) has no float64: the eager loop over experts does
    options = {"experts_implementation": "eager"} if family in ("qwen3_moe", "gpt_oss") else {}
    # eager attention: the reference must apply Gemma 2's attention soft cap, which SDPA drops
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dirs[family]), dtype=torch.float64, attn_implementation="eager", **options
    )
    check_against_hooks(model.eval(), checkpointing)


def test_gemma2_learner_applies_the_attention_soft_cap_that_sdpa_drops(tiny_model_dirs):
    """Loaded with SDPA (transformers' default), Gemma 2 would lose its attention logit cap, which vLLM applies:
    the learner switches it to eager attention, and matches the capped reference."""
    directory = str(tiny_model_dirs["gemma2"])
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation="sdpa").eval()
    learner = SteeredLearner(model)
    learner.steering.data = learner.steering.data.double()  # float64 throughout for the comparison
    assert model.config._attn_implementation == "eager"
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager")
    ids = torch.randint(1, model.config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = hooked_logprobs(reference.eval(), torch.zeros(4, model.config.hidden_size), ids, mask)
        uncapped = hooked_logprobs(
            AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation="sdpa").eval(),
            torch.zeros(4, model.config.hidden_size),
            ids,
            mask,
        )
        ours = learner.token_logprobs(ids, mask)
    assert (expected - uncapped).abs().max() > 1e-3  # the cap matters for this model
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)


def test_sliding_window_layers_get_their_own_mask(tiny_model_dirs):
    """Mistral with a window shorter than the sequences (every layer), and Qwen3 with some layers sliding."""
    alternating = ["full_attention", "sliding_attention"] * 2
    for family, options in [("mistral", {"sliding_window": 6}),
                            ("qwen3", {"sliding_window": 6, "layer_types": alternating})]:  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs[family]), dtype=torch.float64, **options)
        assert "sliding_attention" in (getattr(model.config, "layer_types", None) or ["sliding_attention"])
        check_against_hooks(model.eval(), checkpointing=False)


def test_wrong_shape_is_refused(tiny_model_dirs):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs["qwen2"]))
    with pytest.raises(ValueError, match=r"steering has shape \(4, 64\), the model needs \(4, 128\)"):
        SteeredLearner(model, torch.zeros(4, 64))


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_logprobs_at_a_sampling_temperature_are_those_of_the_tempered_distribution(tiny_model_dirs, temperature):
    """The engine's processed logprobs are log softmax(logits / T): the learner must score the same thing."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs["llama"]), dtype=torch.float64).eval()
    config = model.config
    table = torch.randn(config.num_hidden_layers, config.hidden_size, dtype=torch.float64) * 0.3
    ids = torch.randint(1, config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = hooked_logprobs(model, table, ids, mask, temperature)
    learner = SteeredLearner(model, table.float())
    learner.steering.data = table.clone()
    with torch.no_grad():
        ours = learner.token_logprobs(ids, mask, temperature)
        plain = learner.token_logprobs(ids, mask)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)
    assert (ours - plain).abs().max() > 0.05  # the temperature matters at these logits
