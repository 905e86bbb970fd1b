"""The serving benchmark's workload: every round sends fresh prompts of the same shape, so vLLM's prefix cache
cannot turn later rounds into decode-only work."""

from benchmarks.bench_serving import round_prompts


def test_every_round_sends_fresh_prompts_of_the_same_lengths():
    rounds = [round_prompts(r, batch=16, prompt_len=128) for r in range(6)]
    assert all(len(prompts) == 16 and all(len(p) == 128 for p in prompts) for prompts in rounds)
    # no prompt recurs, within a round or across rounds, nor does any first cache block (16 tokens)
    assert len({tuple(p) for prompts in rounds for p in prompts}) == 6 * 16
    assert len({tuple(p[:16]) for prompts in rounds for p in prompts}) == 6 * 16
    assert round_prompts(3, 16, 128) == rounds[3]  # every engine gets the same prompts within a round
