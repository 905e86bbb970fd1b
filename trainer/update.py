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


@dataclass
class RunBatch:
    """One training run's share of a learner step: its samples (prompt ids, Sample), their advantages and which
    count in the loss (``keep``, 0/1), and what steps it: its own loss options, parameters, optimizer and
    schedule."""

    sequences: list
    advantage: torch.Tensor
    keep: torch.Tensor
    options: LossOptions
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def learn(trainable, optimizer, scheduler, sequences, advantage, keep, options: LossOptions, pad_id: int) -> dict:
    """One run's optimizer step: ``sequences`` (prompt ids, Sample) pairs with their ``advantage`` and ``keep``."""
    run = RunBatch(sequences, advantage, keep, options, trainable.parameters(), optimizer, scheduler)
    return learn_runs(trainable.learner, trainable.reference_logprobs, [run], pad_id)[0]


def learn_runs(learner, reference_logprobs, runs: list[RunBatch], pad_id: int) -> list[dict]:
    """An optimizer step for every run from one pass of the learner over all runs' sequences (a sweep).

    Each sequence reads its own run's vectors (the learner's ``runs`` argument), each run's loss is normalised
    over its own samples (and ranks), and each run clips its own gradient and steps its own optimizer, so every
    run takes the step it would take alone; micro-batches may mix runs. Sequences whose loss has no gradient
    (advantage 0, as in a group whose samples all scored the same, or masked out; with no KL term) get a
    forward without autograd, for the engine-learner canary, and no backward. Returns each run's metrics.
    """
    if len(runs) != len(learner.run_vectors):
        raise ValueError(f"learn_runs: the learner holds {len(learner.run_vectors)} runs' vectors, got {len(runs)} "
                         "runs' batches (batch r steps the learner's row r)")  # fmt: skip
    device = runs[0].parameters[0].device
    temperature, size = runs[0].options.temperature, runs[0].options.micro_batch_size
    items = [(r, i) for r, run in enumerate(runs) for i in range(len(run.sequences))]
    passive = [flag for run in runs for flag in gradient_free(run.advantage, run.keep, run.options)]
    chunks = micro_batches([k for k in range(len(items)) if not passive[k]], size)
    backward_chunks = len(chunks)
    chunks += micro_batches([k for k in range(len(items)) if passive[k]], size)
    members = [[items[k] for k in chunk] for chunk in chunks]  # each micro-batch's (run, sequence) pairs
    owners = [torch.tensor([r for r, _ in pairs], device=device) for pairs in members]
    batches = [pad([runs[r].sequences[i] for r, i in pairs], pad_id, device) for pairs in members]
    masks = []
    for batch, pairs in zip(batches, members, strict=True):
        keep = torch.stack([runs[r].keep[i] for r, i in pairs]).to(device)
        masks.append(batch["mask"] * keep[:, None])
    denominators = []
    for r, run in enumerate(runs):
        mine = [mask[owner == r] for mask, owner in zip(masks, owners, strict=True)]
        local = loss_denominators(mine, run.options.normalization, run.options.constant)
        denominators.append(_global(local, mine, run.options, device))
    totals = [dict.fromkeys(("loss", "gap_sum", "gap_tokens", "kl_sum", "clipped_tokens"), 0.0) for _ in runs]
    for number, (batch, mask, pairs, owner) in enumerate(zip(batches, masks, members, owners, strict=True)):
        ids, attention, positions = batch["input_ids"], batch["attention_mask"], batch["positions"]
        present = sorted({r for r, _ in pairs})
        advantage = torch.stack([runs[r].advantage[i] for r, i in pairs]).to(device)
        backward = number < backward_chunks
        with torch.set_grad_enabled(backward):
            rows = None if len(runs) == 1 else owner
            logprobs = learner.token_logprobs(ids, attention, temperature, rows).gather(1, positions)
            reference = None
            if any(runs[r].options.kl_coef > 0 for r in present):
                reference = reference_logprobs(ids, attention, temperature).gather(1, positions)
            loss = 0.0
            for r in present:
                options, total = runs[r].options, totals[r]
                take = slice(None) if len(present) == 1 else owner == r
                part = policy_loss(logprobs[take], batch["engine_logprobs"][take], mask[take], advantage[take],
                                   denominators[r], options.tis_cap, None if reference is None else reference[take],
                                   options.kl_coef)  # fmt: skip
                loss = loss + part
                total["loss"] += float(part.detach())
                tokens, log_ratio = batch["mask"][take], logprobs[take].detach() - batch["engine_logprobs"][take]
                total["gap_sum"] += float((log_ratio.abs() * tokens).sum())
                total["gap_tokens"] += float(tokens.sum())
                if reference is not None:
                    total["kl_sum"] += float((kl_k3(logprobs[take].detach(), reference[take]) * tokens).sum())
                if options.tis_cap is not None:
                    total["clipped_tokens"] += float(((log_ratio.exp() > options.tis_cap) * tokens).sum())
        if backward:
            loss.backward()
    results = []
    for run, total in zip(runs, totals, strict=True):
        for parameter in run.parameters:
            if parameter.grad is None:  # no backward ran (every sequence gradient-free): a zero gradient, as it
                parameter.grad = torch.zeros_like(parameter)  # is, so the optimizer still steps (Adam's momentum)
        _all_reduce_gradients(run.parameters)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.parameters, run.options.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        # token sums over every completion token (masked-out ones included), summed over ranks by the caller
        results.append({**total, "loss": _sum(total["loss"], device), "grad_norm": float(grad_norm)})
    return results


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
