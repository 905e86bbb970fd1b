"""One optimizer step over data-parallel ranks equals the step of one process holding the whole batch.

Two gloo processes each hold half of the samples (the learner, the op, the loss and the all-reduces are
real); their vectors after two steps must equal a single process's, for every loss normalisation.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from server_utils import free_port

from trainer.rollout import Sample
from trainer.trainables import SteeringTrainable
from trainer.update import LossOptions, learn

pytestmark = pytest.mark.slow  # two spawned processes

NORMALIZATIONS = ["token_sum", "token_mean", "sequence_mean"]


def _batch(vocab_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for i in range(6):
        prompt = torch.randint(1, vocab_size, (5 + i,), generator=g).tolist()
        completion = torch.randint(1, vocab_size, (3 + 2 * i,), generator=g).tolist()
        logprobs = (-torch.rand(len(completion), generator=g)).tolist()
        sequences.append((prompt, Sample(completion, logprobs, "", truncated=False)))
    advantage = torch.randn(6, generator=g)
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # one masked-out sequence
    return sequences, advantage, keep


def _train(model_dir, normalization, rows):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainable = SteeringTrainable(model, None, False, model_dir)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    options = LossOptions(temperature=1.0, micro_batch_size=2, normalization=normalization, constant=16,
                          max_grad_norm=1.0)  # fmt: skip
    sequences, advantage, keep = _batch(model.config.vocab_size)
    for _ in range(2):
        learn(trainable, optimizer, scheduler, [sequences[i] for i in rows], advantage[rows], keep[rows], options, 0)
    return trainable.learner.steering.detach().clone()


def _rank(rank, world_size, port, model_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for normalization in NORMALIZATIONS:
            results[rank, normalization] = _train(model_dir, normalization, list(range(rank, 6, world_size)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tiny_model_dirs):
    """{(rank, normalization): vectors after two steps}: two gloo ranks spawned once, every normalization in turn."""
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(2, free_port(), str(tiny_model_dirs["qwen2"]), results), nprocs=2, join=True)
    return dict(results)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_two_gloo_ranks_take_the_single_process_step(tiny_model_dirs, ranks, normalization):
    single = _train(str(tiny_model_dirs["qwen2"]), normalization, list(range(6)))
    assert single.abs().max() > 0.01  # the step moved the vectors
    for rank in (0, 1):
        result = ranks[rank, normalization]
        assert torch.allclose(result, single, atol=1e-6, rtol=0), (result - single).abs().max()
