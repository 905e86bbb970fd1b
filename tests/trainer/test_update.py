"""The learner's step skips the backward of sequences whose loss has no gradient, and takes exactly the step it
took with every backward run (float64, several steps, mixed groups, a step where every group scored the same)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer import update
from trainer.rollout import Sample
from trainer.trainables import SteeringTrainable
from trainer.update import LossOptions, learn

# per step: advantages of 8 sequences (0: a group whose samples all scored the same) and which count (keep)
STEPS = [
    ([0.0, 0.0, 0.0, 0.0, 1.5, -0.5, -0.5, -0.5], [1, 1, 1, 1, 1, 1, 0, 1]),
    ([0.0] * 8, [1] * 8),  # nothing to learn: Adam's momentum still moves the vectors
    ([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0], [1, 1, 1, 0, 1, 1, 1, 1]),
]


def _sequences(vocab_size):
    g = torch.Generator().manual_seed(3)
    sequences = []
    for i in range(8):
        prompt = torch.randint(1, vocab_size, (4 + i % 3,), generator=g).tolist()
        completion = torch.randint(1, vocab_size, (2 + i,), generator=g).tolist()
        sequences.append((prompt, Sample(completion, (-torch.rand(len(completion), generator=g)).tolist(), "", False)))
    return sequences


def _train(model_dir, backwards: list[int] | None = None) -> tuple[torch.Tensor, list[dict]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    trainable = SteeringTrainable(model, None, False, model_dir)
    trainable.learner.steering.data = trainable.learner.steering.data.double()
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=0.05, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    options = LossOptions(temperature=1.0, micro_batch_size=3, normalization="token_sum", constant=16,
                          max_grad_norm=1.0)  # fmt: skip
    if backwards is not None:  # count the sequences that went through a backward
        forward = trainable.learner.token_logprobs

        def counting(ids, *args, **kwargs):
            if torch.is_grad_enabled():
                backwards[-1] += ids.shape[0]
            return forward(ids, *args, **kwargs)

        trainable.learner.token_logprobs = counting
    sequences, metrics = _sequences(model.config.vocab_size), []
    for advantage, keep in STEPS:
        if backwards is not None:
            backwards.append(0)
        advantage, keep = torch.tensor(advantage, dtype=torch.float64), torch.tensor(keep, dtype=torch.float64)
        metrics.append(learn(trainable, optimizer, scheduler, sequences, advantage, keep, options, 0))
    return trainable.learner.steering.detach().clone(), metrics


def test_gradient_free_sequences_skip_the_backward_and_the_step_is_unchanged(tiny_model_dirs, monkeypatch):
    model_dir = str(tiny_model_dirs["qwen2"])
    backwards: list[int] = []
    skipping, metrics = _train(model_dir, backwards)
    assert backwards == [3, 0, 3]  # only sequences with a non-zero advantage that count
    with monkeypatch.context() as patch:
        patch.setattr(update, "gradient_free", lambda advantage, keep, options: [False] * len(advantage))
        every, every_metrics = _train(model_dir)
    assert skipping.abs().max() > 0.01  # the steps moved the vectors
    # float64: measured 3.6e-16 (the same gradient summed over other micro-batches). Skipping a sequence that has
    # a gradient, or the optimizer step of a step with no backward, fails here (checked).
    assert torch.allclose(skipping, every, atol=1e-14, rtol=0), (skipping - every).abs().max()
    for ours, theirs in zip(metrics, every_metrics, strict=True):  # the canary still sees every sequence
        assert ours["gap_tokens"] == theirs["gap_tokens"]
        assert ours["gap_sum"] == pytest.approx(theirs["gap_sum"], abs=1e-12)
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-12)


def test_a_kl_term_gives_every_sequence_a_gradient():
    options = LossOptions(1.0, 2, "token_sum", 16, 1.0, kl_coef=0.1)
    assert update.gradient_free(torch.zeros(3), torch.ones(3), options) == [False] * 3
    options.kl_coef = 0.0
    assert update.gradient_free(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1, 1, 0]), options) == [True, False, True]
