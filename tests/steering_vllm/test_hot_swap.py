"""update_steering on a running vllm.LLM (compiled, vLLM's default; prefix cache on): in place, prefix cache
consistent, a failed update changes nothing."""

import pytest
import torch
from engine_utils import greedy, max_abs_diff, random_prompts, shutdown, start_engine
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors, SteeringVectorsError, update_steering

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROMPT_LENGTH = 400  # three full KV blocks of 128 are cached and reused by the second request
MAX_TOKENS = 8


def _vectors(seed):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)


A, B = _vectors(10), _vectors(11)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(2, PROMPT_LENGTH, VOCAB_SIZE, seed=12)


@pytest.fixture(scope="module")
def swaps(tiny_model_dirs, prompts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("swap")
    a_path = A.save(directory / "a.safetensors")
    llm = start_engine(tiny_model_dirs["qwen2"], additional_config={"steering_vectors": str(a_path)})
    config = llm.llm_engine.vllm_config
    runs = {"block_size": config.cache_config.block_size, "compile_mode": config.compilation_config.mode}
    runs["prefix_caching"] = config.cache_config.enable_prefix_caching
    runs["first"] = greedy(llm, prompts, MAX_TOKENS)  # fills the prefix cache under A
    # What a swap without the cache reset would serve: B's weights over A's cached prompt blocks.
    llm.collective_rpc("steering_update", args=(B.to_bytes(),))
    runs["stale"] = greedy(llm, prompts, MAX_TOKENS)
    runs["hash"] = update_steering(llm, B)
    runs["swapped"] = greedy(llm, prompts, MAX_TOKENS)
    runs["table"] = SteeringVectors.from_bytes(llm.collective_rpc("steering_table")[0]).to_tensor()
    runs["errors"] = []
    for bad in (SteeringVectors.zeros(NUM_LAYERS, 64), SteeringVectors.zeros(NUM_LAYERS + 1, HIDDEN_SIZE), directory):
        with pytest.raises(SteeringVectorsError) as error:
            update_steering(llm, bad)
        runs["errors"].append(str(error.value))
    runs["after_failures"] = greedy(llm, prompts, MAX_TOKENS)
    update_steering(llm, a_path)  # from a file
    runs["back"] = greedy(llm, prompts, MAX_TOKENS)
    runs["choices"] = {}
    for label, choice in CHOICES.items():
        with pytest.raises(ValueError) as error:
            _generate_with(llm, prompts[0], choice)
        runs["choices"][label] = str(error.value)
    # A front end without the plugin's hooks (the instance's wrappers dropped, the class's methods back):
    # the engine core refuses the choice itself, and the request ends with an error instead of tokens.
    processor = llm.llm_engine.input_processor
    del processor.process_inputs, processor.process_inputs_async
    runs["unhooked"] = [_generate_with(llm, prompts[0], choice) for choice in CHOICES.values()]
    runs["unhooked_plain"] = _generate_with(llm, prompts[0], None)
    shutdown(llm)
    # eager: a fresh engine's output does not depend on its mode (compiled and eager agree within 2e-6 here), and
    # eager starts in a fifth of the time
    fresh = start_engine(tiny_model_dirs["qwen2"], enforce_eager=True, additional_config={
        "steering_vectors": str(B.save(directory / "b.safetensors"))
    })  # fmt: skip
    runs["fresh_b"] = greedy(fresh, prompts, MAX_TOKENS)
    shutdown(fresh)
    return runs


CHOICES = {"set": {"steering": "a"}, "none": {"steering": "none"}, "scale": {"steering_scale": 0.5}}


def _generate_with(llm, prompt, extra_args):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra_args)
    (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    return {"tokens": list(output.outputs[0].token_ids), "finish_reason": output.outputs[0].finish_reason}


def _same(x, y, tolerance=1e-5):
    return all(
        a["tokens"] == b["tokens"] and max_abs_diff(a["logprobs"], b["logprobs"]) < tolerance
        for a, b in zip(x, y, strict=True)
    )


def test_after_a_swap_the_engine_serves_what_a_fresh_engine_with_the_new_vectors_serves(swaps):
    assert PROMPT_LENGTH >= 3 * swaps["block_size"]
    assert swaps["prefix_caching"] and swaps["compile_mode"] != 0  # 0 = CompilationMode.NONE
    assert _same(swaps["swapped"], swaps["fresh_b"])
    assert not _same(swaps["first"], swaps["fresh_b"], tolerance=1e-2)  # the swap changed the output


def test_without_the_cache_reset_stale_blocks_would_be_served(swaps):
    """The control for the test above: the same copy without the reset gives a different, wrong answer."""
    assert not _same(swaps["stale"], swaps["fresh_b"], tolerance=1e-3)


def test_the_workers_hold_the_new_vectors_and_the_hash_is_theirs(swaps):
    assert torch.equal(swaps["table"], B.to_tensor())
    assert swaps["hash"] == B.content_hash()


def test_a_failed_update_changes_nothing(swaps):
    assert "hidden_size 64 does not match the model's 128" in swaps["errors"][0]
    assert f"num_layers {NUM_LAYERS + 1} does not match" in swaps["errors"][1]
    assert "no 'model.layers.<l>.mlp.down_proj.bias' tensors found" in swaps["errors"][2]  # a directory
    assert _same(swaps["after_failures"], swaps["swapped"])


def test_swapping_back_restores_the_first_output(swaps):
    assert _same(swaps["back"], swaps["first"])


def test_an_engine_without_sets_refuses_a_steering_choice_instead_of_serving_its_one_set(swaps):
    """A request that asks for a set, for no steering or for a scale would otherwise get the global vectors."""
    for label, message in swaps["choices"].items():
        assert "needs per-request steering" in message and "--steering-sets NAME=PATH" in message, label


def test_the_engine_core_refuses_a_choice_that_got_past_a_front_end_without_the_hooks(swaps):
    assert [u["finish_reason"] for u in swaps["unhooked"]] == ["error"] * len(CHOICES)
    assert all(u["tokens"] == [] for u in swaps["unhooked"])
    assert swaps["unhooked_plain"]["tokens"] == swaps["back"][0]["tokens"]  # a request choosing nothing is served
