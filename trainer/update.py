"""One optimizer step from scored samples: pad, recompute logprobs with the learner, loss, backward over
micro-batches, all-reduce across data-parallel ranks, clip, step.

Under ``torchrun`` each rank holds its own prompts' samples; the loss denominators are summed over ranks
first and the gradients after, so every rank takes the same step as one process holding the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.objective import kl_k3, loss_denominators, policy_loss


@dataclass
class LossOptions:
    temperature: float
    micro_batch_size: int
    normalization: str
    constant: int
    max_grad_norm: float
    tis_cap: float | None = None
    kl_coef: float = 0.0


def learn(trainable, optimizer, scheduler, sequences, advantage, keep, options: LossOptions, pad_id: int) -> dict:
    """``sequences``: (prompt ids, Sample) pairs; ``advantage`` and ``keep`` (0/1: counts in the loss) per pair.

    Sequences whose loss has no gradient (advantage 0, as in a group whose samples all scored the same, or
    masked out; with no KL term) get a forward without autograd, for the engine-learner canary, and no backward.
    """
    device = trainable.learner.steering.device
    passive = gradient_free(advantage, keep, options)
    chunks = micro_batches([i for i in range(len(sequences)) if not passive[i]], options.micro_batch_size)
    backward_chunks = len(chunks)
    chunks += micro_batches([i for i in range(len(sequences)) if passive[i]], options.micro_batch_size)
    batches = [pad([sequences[i] for i in chunk], pad_id, device) for chunk in chunks]
    masks = [b["mask"] * keep[chunk].to(device)[:, None] for b, chunk in zip(batches, chunks, strict=True)]
    denominator = _global(loss_denominators(masks, options.normalization, options.constant), masks, options, device)
    loss_total, gap_sum, gap_tokens, kl_sum, clipped = 0.0, 0.0, 0.0, 0.0, 0.0
    for number, (batch, mask, chunk) in enumerate(zip(batches, masks, chunks, strict=True)):
        ids, attention, positions = batch["input_ids"], batch["attention_mask"], batch["positions"]
        backward = number < backward_chunks
        with torch.set_grad_enabled(backward):
            logprobs = trainable.learner.token_logprobs(ids, attention, options.temperature).gather(1, positions)
            reference = None
            if options.kl_coef > 0:
                reference = trainable.reference_logprobs(ids, attention, options.temperature).gather(1, positions)
            loss = policy_loss(logprobs, batch["engine_logprobs"], mask, advantage[chunk].to(device), denominator,
                               options.tis_cap, reference, options.kl_coef)  # fmt: skip
        if backward:
            loss.backward()
        loss_total += float(loss.detach())
        tokens, log_ratio = batch["mask"], logprobs.detach() - batch["engine_logprobs"]
        gap_sum += float((log_ratio.abs() * tokens).sum())
        gap_tokens += float(tokens.sum())
        if reference is not None:
            kl_sum += float((kl_k3(logprobs.detach(), reference) * tokens).sum())
        if options.tis_cap is not None:
            clipped += float(((log_ratio.exp() > options.tis_cap) * tokens).sum())
    parameters = trainable.parameters()
    for parameter in parameters:
        if parameter.grad is None:  # no backward ran (every sequence gradient-free): a zero gradient, as it is,
            parameter.grad = torch.zeros_like(parameter)  # so the optimizer still steps (Adam's momentum moves)
    _all_reduce_gradients(parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # token sums over every completion token (masked-out ones included), summed over ranks by the caller
    return {"loss": _sum(loss_total, device), "grad_norm": float(grad_norm), "gap_sum": gap_sum,
            "gap_tokens": gap_tokens, "kl_sum": kl_sum, "clipped_tokens": clipped}  # fmt: skip


def gradient_free(advantage: torch.Tensor, keep: torch.Tensor, options: LossOptions) -> list[bool]:
    """Per sequence: whether its loss term is exactly zero whatever the weights (-A * log p * mask with A = 0 or
    mask 0, times an importance weight). A KL term gives every sequence a gradient."""
    if options.kl_coef > 0:
        return [False] * len(advantage)
    return ((advantage == 0) | (keep == 0)).tolist()


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def pad(sequences, pad_id: int, device) -> dict:
    """Right-padded prompt+completion ids, and per completion token: where its logprob is, whether it counts,
    and the engine's logprob of it ([B, longest completion], left-aligned)."""
    width = max(len(p) + len(s.token_ids) for p, s in sequences)
    completion_width = max(1, max(len(s.token_ids) for _, s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    positions = torch.zeros(len(sequences), completion_width, dtype=torch.long)
    mask = torch.zeros(len(sequences), completion_width)
    engine = torch.zeros(len(sequences), completion_width)
    for row, (prompt, sample) in enumerate(sequences):
        tokens = prompt + sample.token_ids
        ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        n = len(sample.token_ids)
        # token_logprobs' entry t-1 scores token t: the completion's k-th token is scored at len(prompt)-1+k
        positions[row] = (len(prompt) - 1 + torch.arange(completion_width)).clamp(max=width - 2)
        mask[row, :n] = 1
        engine[row, :n] = torch.tensor(sample.logprobs[:n])
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "positions": positions.to(device),
            "mask": mask.to(device), "engine_logprobs": engine.to(device)}  # fmt: skip


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global(denominator: dict, masks, options: LossOptions, device) -> dict:
    """The denominator of the whole step's batch, over all ranks."""
    if not distributed():
        return denominator
    counts = torch.tensor([sum(m.shape[0] for m in masks), sum(float(m.sum()) for m in masks)], device=device,
                          dtype=torch.float64)  # fmt: skip
    dist.all_reduce(counts)
    sequences, tokens = float(counts[0]), float(counts[1])
    value = {"token_sum": options.constant * sequences, "token_mean": max(tokens, 1.0), "sequence_mean": sequences}
    return {"kind": denominator["kind"], "value": value[denominator["kind"]]}


def _all_reduce_gradients(parameters) -> None:
    if not distributed():
        return
    for parameter in parameters:
        dist.all_reduce(parameter.grad)


def _sum(value: float, device) -> float:
    if not distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total)
