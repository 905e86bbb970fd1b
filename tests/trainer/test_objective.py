"""Advantages, loss normalisation, masking, importance weights: against loops written from the definitions."""

import pytest
import torch

from trainer.objective import advantages, loss_denominators, policy_loss, zero_variance_fraction


def test_rloo_is_leave_one_out():
    rewards = torch.rand(5, 4, dtype=torch.float64)
    expected = torch.empty_like(rewards)
    for g in range(5):
        for i in range(4):
            others = [rewards[g, j] for j in range(4) if j != i]
            expected[g, i] = rewards[g, i] - sum(others) / 3
    assert torch.allclose(advantages(rewards, "rloo"), expected, atol=1e-12)


def test_group_mean_and_std_scaling():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert advantages(rewards, "group_mean").tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4]
    scaled = advantages(rewards, "group_mean", scale_by_std=True)
    assert torch.allclose(scaled[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (0.57735 + 1e-6),
                          atol=1e-4)  # fmt: skip
    assert scaled[1].abs().max() == 0  # a zero-variance group stays zero, no division by zero
    assert zero_variance_fraction(rewards) == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 samples"):
        advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="unknown advantage 'ppo'"):
        advantages(torch.zeros(3, 2), "ppo")
    with pytest.raises(ValueError, match="unknown loss_normalization"):
        loss_denominators([torch.ones(2, 3)], "mean", 10)


def _batch():
    logprobs = -torch.rand(4, 6, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float64
    )
    advantage = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
    return logprobs, mask, advantage


@pytest.mark.parametrize("normalization", ["token_sum", "token_mean", "sequence_mean"])
def test_loss_normalisations_match_their_definitions(normalization):
    logprobs, mask, advantage = _batch()
    terms = [[-advantage[b] * logprobs[b, t] for t in range(6) if mask[b, t]] for b in range(4)]
    expected = {
        "token_sum": sum(sum(row) for row in terms) / (10 * 4),  # constant 10 x 4 sequences
        "token_mean": sum(sum(row) for row in terms) / 11,  # 11 counted tokens
        "sequence_mean": sum(sum(row) / len(row) for row in terms if row) / 4,
    }[normalization]
    denominator = loss_denominators([mask], normalization, constant=10)
    assert float(policy_loss(logprobs, logprobs, mask, advantage, denominator)) == pytest.approx(float(expected))


@pytest.mark.parametrize("normalization", ["token_sum", "token_mean", "sequence_mean"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(normalization):
    logprobs, mask, advantage = _batch()
    full = logprobs.clone().requires_grad_(True)
    policy_loss(full, full.detach(), mask, advantage, loss_denominators([mask], normalization, 10)).backward()
    parts = logprobs.clone().requires_grad_(True)
    denominator = loss_denominators([mask[:2], mask[2:]], normalization, 10)
    for rows in (slice(0, 2), slice(2, 4)):
        policy_loss(parts[rows], parts[rows].detach(), mask[rows], advantage[rows], denominator).backward()
    assert torch.allclose(full.grad, parts.grad, atol=1e-12)
    assert (full.grad[mask == 0] == 0).all()  # masked tokens get no gradient


def test_truncated_importance_weights_are_capped_and_not_differentiated():
    logprobs, mask, advantage = _batch()
    engine = logprobs - torch.tensor([0.0, 0.1, 2.0, 0.0], dtype=torch.float64)[:, None]  # ratios 1, e^0.1, e^2
    learner = logprobs.clone().requires_grad_(True)
    denominator = loss_denominators([mask], "token_mean", 10)
    policy_loss(learner, engine, mask, advantage, denominator, tis_cap=2.0).backward()
    weights = torch.tensor([0.0, 0.1, 2.0, 0.0], dtype=torch.float64).exp().clamp(max=2.0)[:, None]
    expected = -advantage[:, None] * weights * mask / 11
    assert torch.allclose(learner.grad, expected, atol=1e-12)


def test_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    logprobs, mask, advantage = _batch()
    zero_advantage = torch.zeros_like(advantage)
    denominator = loss_denominators([mask], "token_mean", 10)
    at_reference = policy_loss(logprobs, logprobs, mask, zero_advantage, denominator, None, logprobs, kl_coef=0.1)
    away = policy_loss(logprobs, logprobs, mask, zero_advantage, denominator, None, logprobs - 0.3, kl_coef=0.1)
    assert float(at_reference) == 0.0
    assert float(away) == pytest.approx(0.1 * (torch.tensor(-0.3).exp() + 0.3 - 1).item())
