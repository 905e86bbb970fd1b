"""Per-request sets over HTTP on a real `serve` process (compiled, prefix cache on, --api-key): the openai
client picks a set by `model` or `vllm_xargs`; sets listed in /v1/models; PUT / DELETE /v1/steering/sets/{name};
a stream that spans a replacement of its set keeps the vectors it was admitted with."""

import threading
import time

import openai
import pytest
import requests
import torch
from engine_utils import hf_reference, max_abs_diff, random_prompts
from server_utils import running_server
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = "test-key"
ALIAS = "tiny"  # a second served model name, which no set may take
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = dict(temperature=0, logprobs=1, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
STREAMED_TOKENS = 800  # long enough to be running when its set is replaced
TOLERANCE = 1e-5  # logprobs against the HF reference; measured <= 1e-6 (fp32)


def _vectors(seed):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)


A, B, C, A2 = _vectors(40), _vectors(41), _vectors(42), _vectors(43)


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sets")
    sets = [f"a={A.save(directory / 'a.safetensors')}", f"b={B.save(directory / 'b.safetensors')}"]
    flags = ["--steering-sets", *sets, "--max-steering-configs", "4", "--api-key", KEY,
             "--served-model-name", str(tiny_model_dirs["qwen2"]), ALIAS]  # fmt: skip
    env = {"VLLM_PLUGINS": "steering_vllm"}
    log_dir = tmp_path_factory.mktemp("sets-log")
    with running_server(tiny_model_dirs["qwen2"], flags, log_dir, env, compiled=True) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)


def _completion(client, model, prompt, max_tokens=8, **extra):
    body = {**GREEDY["extra_body"], **extra}
    request = {**GREEDY, "extra_body": body}
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=max_tokens, **request)
    choice = raw.parse().choices[0]
    tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    return {"tokens": tokens, "logprobs": choice.logprobs.token_logprobs, "hash": raw.headers.get("x-steering-hash")}


def _assert_served(model_dir, vectors, prompt, generation):
    table = None if vectors is None else vectors.to_tensor()
    reference = hf_reference(model_dir, table, [prompt], [generation])[0]
    assert generation["tokens"] == reference["argmax"]
    assert max_abs_diff(generation["logprobs"], reference["logprobs"]) < TOLERANCE


def test_models_lists_the_base_model_and_each_set(client, tiny_model_dirs):
    models = [m.id for m in client.models.list().data]
    assert models[0] == str(tiny_model_dirs["qwen2"]) and {"a", "b"} <= set(models[1:])
    cards = {m.id: m for m in client.models.list().data}
    assert cards["a"].parent == models[0]


def test_a_set_may_not_take_a_served_models_name(server):
    response = requests.put(f"{server}/v1/steering/sets/{ALIAS}", data=C.to_bytes(), headers=AUTH, timeout=60)
    assert response.status_code == 409 and "already names a served model" in response.json()["error"]["message"]
    assert ALIAS not in requests.get(f"{server}/v1/steering", headers=AUTH, timeout=60).json()["sets"]


def test_a_set_is_chosen_by_model_name_or_by_vllm_xargs(client, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    prompt = random_prompts(1, 200, VOCAB_SIZE, seed=44)[0]
    by_name = _completion(client, "a", prompt)
    _assert_served(model_dir, A, prompt, by_name)
    assert by_name["hash"] == A.content_hash()
    by_xargs = _completion(client, model_dir, prompt, vllm_xargs={"steering": "b"})
    _assert_served(model_dir, B, prompt, by_xargs)
    mixed = _completion(client, model_dir, prompt, vllm_xargs={"steering": ["a", "b"], "steering_scale": [0.5, 0.5]})
    _assert_served(model_dir, SteeringVectors.from_tensor(0.5 * A.to_tensor() + 0.5 * B.to_tensor()), prompt, mixed)
    _assert_served(model_dir, None, prompt, _completion(client, model_dir, prompt))  # no default set: zeros


def test_bad_choices_get_a_400_naming_the_problem(client, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    prompt = [1, 2, 3]
    for extra, message in [
        ({"vllm_xargs": {"steering": "zzz"}}, "unknown steering set 'zzz' (sets: a, b)"),
        ({"vllm_xargs": {"steering": "a", "steering_scale": "x"}}, "finite number"),
        ({"vllm_xargs": {"steering": ["a", "b"], "steering_scale": [1.0]}}, "list of 2 numbers"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _completion(client, model_dir, prompt, **extra)
    with pytest.raises(openai.BadRequestError, match="model names steering set 'a' but vllm_xargs.steering is 'b'"):
        _completion(client, "a", prompt, vllm_xargs={"steering": "b"})
    with pytest.raises(openai.NotFoundError, match="The model `zzz` does not exist"):
        _completion(client, "zzz", prompt)


def test_sets_are_put_and_deleted_over_http(server, client, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    prompt = random_prompts(1, 150, VOCAB_SIZE, seed=45)[0]
    response = requests.put(f"{server}/v1/steering/sets/c", data=C.to_bytes(), headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["sets"]["c"]["content_hash"] == C.content_hash()
    _assert_served(model_dir, C, prompt, _completion(client, "c", prompt))
    assert "c" in [m.id for m in client.models.list().data]
    for path, body, status, message in [
        ("bad%20name", C.to_bytes(), 400, "malformed"),
        ("none", C.to_bytes(), 400, "reserved"),
        ("d", SteeringVectors.zeros(NUM_LAYERS, 64).to_bytes(), 400, "hidden_size 64 does not match"),
    ]:
        response = requests.put(f"{server}/v1/steering/sets/{path}", data=body, headers=AUTH, timeout=60)
        assert response.status_code == status and message in response.json()["error"]["message"], response.text
    assert requests.put(f"{server}/v1/steering/sets/e", data=C.to_bytes(), timeout=60).status_code == 401
    response = requests.delete(f"{server}/v1/steering/sets/c", headers=AUTH, timeout=60)
    assert response.status_code == 200 and "c" not in response.json()["sets"]
    response = requests.delete(f"{server}/v1/steering/sets/c", headers=AUTH, timeout=60)
    assert response.status_code == 404 and "no steering set named 'c'" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        _completion(client, "c", prompt)
    status = requests.get(f"{server}/v1/steering", headers=AUTH, timeout=30).json()
    assert sorted(status["sets"]) == ["a", "b"] and status["max_steering_configs"] == 4
    assert status["sets"]["a"]["norms"] == pytest.approx(A.norms(), rel=1e-6)


def test_a_stream_spanning_a_replacement_of_its_set_keeps_its_vectors(server, client, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    prompt = random_prompts(1, 100, VOCAB_SIZE, seed=46)[0]
    first_token = threading.Event()
    streamed = {"tokens": [], "logprobs": []}

    def stream():
        for chunk in client.completions.create(
            model="a", prompt=prompt, max_tokens=STREAMED_TOKENS, stream=True, **GREEDY
        ):
            choice = chunk.choices[0]
            streamed["tokens"] += [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
            streamed["logprobs"] += choice.logprobs.token_logprobs
            first_token.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_token.wait(120)
    replaced_at = len(streamed["tokens"])
    response = requests.put(f"{server}/v1/steering/sets/a", data=A2.to_bytes(), headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    after = _completion(client, "a", prompt)  # a new request gets the new "a" while the stream runs
    during = len(streamed["tokens"])
    thread.join(300)
    try:
        assert replaced_at < during < STREAMED_TOKENS  # the replacement landed while the stream ran
        _assert_served(model_dir, A, prompt, streamed)  # every token, before and after: the old "a"
        _assert_served(model_dir, A2, prompt, after)
        assert after["hash"] == A2.content_hash()
    finally:
        requests.put(f"{server}/v1/steering/sets/a", data=A.to_bytes(), headers=AUTH, timeout=60)


def test_a_new_configuration_waits_for_a_free_row_when_all_are_taken(server, client, tiny_model_dirs):
    """max_steering_configs is 4: four streams hold four configurations; a fifth configuration is served only
    after one of them ends, and with its own vectors."""
    model_dir = str(tiny_model_dirs["qwen2"])
    prompt = random_prompts(1, 50, VOCAB_SIZE, seed=47)[0]
    holders = [{"steering": "a"}, {"steering": "b"}, {"steering": "a", "steering_scale": 0.5}]
    holders.append({"steering": "b", "steering_scale": 0.5})
    started, ended = threading.Barrier(len(holders) + 1), []

    def hold(xargs):
        stream = client.completions.create(
            model=model_dir,
            prompt=prompt,
            max_tokens=300,
            stream=True,
            extra_body={"vllm_xargs": xargs, **GREEDY["extra_body"]},
            temperature=0,
        )
        for i, _ in enumerate(stream):
            if i == 0:
                started.wait(120)
        ended.append(time.monotonic())

    threads = [threading.Thread(target=hold, args=(xargs,)) for xargs in holders]
    for thread in threads:
        thread.start()
    started.wait(120)  # all four configurations are live
    waiting = _completion(client, model_dir, prompt, vllm_xargs={"steering": "a", "steering_scale": 0.25})
    served_at = time.monotonic()
    for thread in threads:
        thread.join(300)
    assert len(ended) == len(holders) and served_at > min(ended)
    _assert_served(model_dir, SteeringVectors.from_tensor(0.25 * A.to_tensor()), prompt, waiting)
