"""update_steering_async on AsyncLLM (the engine behind `vllm serve`, compiled) while streaming requests run:
each request switches to the new vectors at the swap, mid-stream, with its context recomputed under them."""

import asyncio

import pytest
import torch
from engine_utils import ENGINE_KWARGS, hf_reference, max_abs_diff, random_prompts
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors, SteeringVectorsError, update_steering_async

pytestmark = [pytest.mark.engine, pytest.mark.slow]

CLIENTS = 4
LONG = 160  # tokens per streaming request: long enough to span all the swaps


def _vectors(seed):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)


A, B = _vectors(20), _vectors(21)
SWAPS = (B, A, B)  # the vectors active are A, then each of these in turn
TOLERANCE = 1e-5  # engine vs HF logprobs, fp32: measured <= 4.8e-7


async def _generate(engine, prompt, max_tokens, request_id, streaming: asyncio.Event | None = None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    final = None
    async for output in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id=request_id):
        final = output
        if streaming is not None:
            streaming.set()  # its first tokens arrived
    completion = final.outputs[0]
    logprobs = [entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs, strict=True)]
    return {"tokens": list(completion.token_ids), "logprobs": logprobs}


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    a_path = A.save(tmp_path_factory.mktemp("async") / "a.safetensors")
    prompts = random_prompts(CLIENTS, 300, VOCAB_SIZE, seed=13)

    async def scenario():
        engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=str(tiny_model_dirs["qwen2"]),
                additional_config={"steering_vectors": str(a_path)},
                **ENGINE_KWARGS,
            )
        )
        try:
            streaming = [asyncio.Event() for _ in prompts]
            clients = [asyncio.create_task(_generate(engine, p, LONG, f"long-{i}", streaming[i]))
                       for i, p in enumerate(prompts)]  # fmt: skip
            # every stream has tokens from A before the first swap (a busy machine may take seconds to prefill)
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in streaming)), 300)
            running_at_first_swap = sum(not c.done() for c in clients)
            hashes = []
            for vectors in SWAPS:
                hashes.append(await update_steering_async(engine, vectors))
                await asyncio.sleep(0.2)
            with pytest.raises(SteeringVectorsError, match="hidden_size 64 does not match"):
                await update_steering_async(engine, SteeringVectors.zeros(NUM_LAYERS, 64))
            streamed = await asyncio.gather(*clients)
            # The same prompts again: their cached blocks must not come from before the swaps.
            after = [await _generate(engine, p, 8, f"after-{i}") for i, p in enumerate(prompts)]
        finally:
            engine.shutdown()
        return dict(running_at_first_swap=running_at_first_swap, hashes=hashes, streamed=streamed, after=after)

    result = asyncio.run(scenario())
    model_dir = tiny_model_dirs["qwen2"]
    result["reference"] = hf_reference(model_dir, B.to_tensor(), prompts, result["after"])
    # each streamed sequence teacher-forced under each set of vectors it may have been generated with
    result["streamed_under"] = {
        name: hf_reference(model_dir, vectors.to_tensor(), prompts, result["streamed"])
        for name, vectors in (("A", A), ("B", B))
    }
    return result


def _segments(streamed: dict, under: dict) -> list[tuple[str, int]]:
    """Which vectors produced each token: [(name, count), ...] walking A, B, A, B in order, or AssertionError.

    A token was produced under a set when it is that set's greedy choice and its logprob is that set's, given
    everything before it (prompt and earlier tokens) recomputed under the same set."""
    order, segment, counts = ["A", "B", "A", "B"], 0, [0, 0, 0, 0]
    for j, (token, logprob) in enumerate(zip(streamed["tokens"], streamed["logprobs"], strict=True)):
        for candidate in range(segment, len(order)):
            reference = under[order[candidate]]
            if reference["argmax"][j] == token and abs(reference["logprobs"][j] - logprob) < TOLERANCE:
                segment = candidate
                break
        else:
            raise AssertionError(f"token {j} ({token}, logprob {logprob}) matches no set at or after {order[segment]}")
        counts[segment] += 1
    return [(name, count) for name, count in zip(order, counts, strict=True) if count]


def test_swaps_landed_while_requests_streamed_and_none_failed(run):
    assert run["running_at_first_swap"] == CLIENTS
    assert all(len(s["tokens"]) == LONG for s in run["streamed"])
    assert run["hashes"] == [B.content_hash(), A.content_hash(), B.content_hash()]


def test_a_request_spanning_a_swap_switches_vectors_at_the_swap_mid_stream(run):
    """Its tokens before the swap are the old vectors' (teacher-forced HF reference), those after it the new
    ones'. A swap that waited for running requests to finish would leave every stream under A: that fails."""
    for index, streamed in enumerate(run["streamed"]):
        under = {name: references[index] for name, references in run["streamed_under"].items()}
        segments = _segments(streamed, under)
        # measured: [(A, 1), (B, 31), (A, 37), (B, 91)] for each of the 4 streams (compiled, 2 cores)
        assert segments[0][0] == "A" and len(segments) > 1, f"stream {index} never switched vectors: {segments}"


def test_after_the_swaps_requests_see_only_the_last_vectors(run):
    for output, reference in zip(run["after"], run["reference"], strict=True):
        assert output["tokens"] == reference["argmax"]
        assert max_abs_diff(output["logprobs"], reference["logprobs"]) < TOLERANCE
