"""RLOO's pieces as pure tensor functions: advantages, the policy-gradient loss and its normalisation.

Shapes: rewards ``[G, N]`` (G prompts, N samples each); per-token tensors ``[B, T]`` with a 0/1 ``mask`` of
the completion tokens that count.
"""

from __future__ import annotations

import torch


def advantages(rewards: torch.Tensor, kind: str = "rloo", scale_by_std: bool = False) -> torch.Tensor:
    """``rloo``: r_i minus the mean of the other N-1 samples of its prompt (leave-one-out);
    ``group_mean``: r_i minus the mean of all N (the paper's appendix). Optionally divided by the group's std.
    """
    n = rewards.shape[1]
    if n < 2:
        raise ValueError(f"advantages need at least 2 samples per prompt, got {n}")
    total = rewards.sum(dim=1, keepdim=True)
    if kind == "rloo":
        result = rewards - (total - rewards) / (n - 1)
    elif kind == "group_mean":
        result = rewards - total / n
    else:
        raise ValueError(f"unknown advantage {kind!r}; expected 'rloo' or 'group_mean'")
    if scale_by_std:
        result = result / (rewards.std(dim=1, keepdim=True) + 1e-6)
    return result


def zero_variance_fraction(rewards: torch.Tensor) -> float:
    """Share of prompts whose samples all got the same reward (they teach nothing)."""
    return float((rewards == rewards[:, :1]).all(dim=1).float().mean())


def loss_denominators(masks: list[torch.Tensor], normalization: str, constant: int) -> dict:
    """What each micro-batch's loss is divided by, computed over the whole step so accumulation is exact."""
    sequences = sum(m.shape[0] for m in masks)
    tokens = sum(float(m.sum()) for m in masks)
    if normalization == "token_sum":  # every token weighs the same whatever the batch's lengths (Dr. GRPO)
        return {"kind": normalization, "value": float(constant * sequences)}
    if normalization == "token_mean":  # mean over the step's tokens: long completions weigh more
        return {"kind": normalization, "value": max(tokens, 1.0)}
    if normalization == "sequence_mean":  # each sequence's token mean, averaged over sequences
        return {"kind": normalization, "value": float(sequences)}
    raise ValueError(f"unknown loss_normalization {normalization!r}")


def policy_loss(
    logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantage: torch.Tensor,
    denominator: dict,
    tis_cap: float | None = None,
    reference_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """This micro-batch's share of the step's loss: -A * log p per token (REINFORCE; the samples are on-policy).

    ``tis_cap``: weight each token by min(p_learner / p_engine, cap) (truncated importance sampling), which
    corrects for numerical gaps between the engine that sampled and the learner. ``reference_logprobs``
    and ``kl_coef``: add kl_coef * KL(learner || reference) per token (the k3 estimator).
    """
    per_token = -advantage[:, None] * logprobs
    if tis_cap is not None:
        per_token = per_token * (logprobs - engine_logprobs).exp().clamp(max=tis_cap).detach()
    if reference_logprobs is not None and kl_coef > 0:
        per_token = per_token + kl_coef * kl_k3(logprobs, reference_logprobs)
    per_token = per_token * mask
    if denominator["kind"] == "sequence_mean":
        per_sequence = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_sequence.sum() / denominator["value"]
    return per_token.sum() / denominator["value"]


def kl_k3(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(learner || reference) from the sampled tokens' logprobs: r - log r - 1 with
    r = p_ref / p_learner (Schulman's k3: unbiased, never negative)."""
    log_ratio = reference_logprobs - logprobs
    return log_ratio.exp() - log_ratio - 1
