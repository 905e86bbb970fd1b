"""Steering in vLLM's scale-out modes, on real `serve` processes (tiny Qwen2, fp32, VLLM_PLUGINS=steering_vllm).

- per-request sets with several API servers (``--api-server-count 2``, or ``--data-parallel-size 2`` which
  starts two by default): refused at start, naming the flag (the other refusals: test_scale_out_checks.py);
- data parallel 2 behind one API server with per-request sets: requests spread over both engines, each
  served its own set (HF-hooks reference), a set PUT through HTTP reaches both, more configurations than rows
  wait and are served right;
- data parallel 2 with its two API servers and global vectors: a steering choice is refused (400) by every
  front end, a file named in a PUT is refused without --steering-dir, a PUT of the bytes swaps every rank,
  and every response's x-steering-hash and tokens are the new vectors';
  vLLM's own load client runs through both front ends with no failure while the vectors are swapped.

Eager (both engines start in ~40 s instead of compiling twice on two cores); the steered graph is the one the
compiled single-engine tests run.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch
from engine_utils import ENGINE_ENV, hf_reference, max_abs_diff, random_prompts
from server_utils import ENGINE_FLAGS, SERVE, free_port, running_server
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PLUGINS = {"VLLM_PLUGINS": "steering_vllm"}
TOLERANCE = 1e-5  # logprobs against the HF reference; measured <= 1e-6 (fp32)
MAX_TOKENS = 6


def _vectors(seed):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)


A, B, C = _vectors(60), _vectors(61), _vectors(62)


@pytest.fixture(scope="module")
def vector_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scale-out-vectors")
    return {name: str(v.save(directory / f"{name}.safetensors")) for name, v in {"a": A, "b": B, "c": C}.items()}


def _completion(url, model, prompt, xargs=None) -> requests.Response:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logprobs": 1,
        "ignore_eos": True,
        "return_tokens_as_token_ids": True,
    }
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return requests.post(f"{url}/v1/completions", json=body, timeout=300)


def _generation(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    return {"tokens": tokens, "logprobs": logprobs["token_logprobs"], "hash": response.headers.get("x-steering-hash")}


def _concurrently(calls) -> list:
    """Run the calls at once (so vLLM's load balancer spreads them over the engines); their results in order."""
    results = [None] * len(calls)

    def run(i, call):
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return results


def _assert_served(model_dir, table, prompts, generations):
    references = hf_reference(model_dir, table, prompts, generations)
    for generation, reference in zip(generations, references, strict=True):
        assert generation["tokens"] == reference["argmax"]
        assert max_abs_diff(generation["logprobs"], reference["logprobs"]) < TOLERANCE


def _requests_per_engine(url) -> dict[str, float]:
    """Finished requests per data-parallel engine, from vLLM's Prometheus metrics (label ``engine``)."""
    counts: dict[str, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = re.search(r'engine="(\d+)"', line).group(1)
            counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


# ---- refused at start --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--api-server-count", "2"], {}, "need one API server, got --api-server-count 2"),
        (["--data-parallel-size", "2"], {}, "with --data-parallel-size 2, vLLM starts 2 API servers"),
    ],
    ids=["api-servers", "data-parallel-default"],
)
def test_modes_that_cannot_serve_per_request_sets_exactly_are_refused_at_start(
    tiny_model_dirs, vector_files, flags, env, message
):
    command = [*SERVE, str(tiny_model_dirs["qwen2"]), *ENGINE_FLAGS, "--enforce-eager", "--port", str(free_port())]
    command += ["--steering-sets", f"a={vector_files['a']}", *flags]
    environment = {**os.environ, **ENGINE_ENV, **PLUGINS, **env}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]


# ---- data parallel behind one API server, per-request sets ------------------------------------------------


@pytest.fixture(scope="module")
def dp_sets_server(tiny_model_dirs, vector_files, tmp_path_factory):
    flags = ["--data-parallel-size", "2", "--api-server-count", "1", "--max-steering-configs", "2"]
    flags += ["--steering-sets", f"a={vector_files['a']}", f"b={vector_files['b']}"]
    with running_server(tiny_model_dirs["qwen2"], flags, tmp_path_factory.mktemp("dp-sets"), PLUGINS) as url:
        yield url


def test_data_parallel_serves_each_request_its_own_set_on_every_engine(dp_sets_server, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    url = dp_sets_server
    prompts = random_prompts(8, 40, VOCAB_SIZE, seed=63)
    choices = [("a", None), (model_dir, {"steering": "b"}), (model_dir, {"steering": "none"}), (model_dir, None)] * 2
    tables = [A.to_tensor(), B.to_tensor(), None, None] * 2
    before = _requests_per_engine(url)
    responses = _concurrently(
        [lambda m=m, x=x, p=p: _completion(url, m, p, x) for (m, x), p in zip(choices, prompts, strict=True)]
    )
    generations = [_generation(r) for r in responses]
    for generation, table, prompt in zip(generations, tables, prompts, strict=True):
        _assert_served(model_dir, table, [prompt], [generation])
    after = _requests_per_engine(url)
    assert sorted(after) == ["0", "1"] and all(after[e] > before.get(e, 0.0) for e in after), (before, after)


def test_data_parallel_a_set_put_over_http_reaches_every_engine(dp_sets_server, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    url = dp_sets_server
    response = requests.put(f"{url}/v1/steering/sets/c", data=C.to_bytes(), timeout=60)
    assert response.status_code == 200, response.text
    prompts = random_prompts(6, 40, VOCAB_SIZE, seed=64)
    before = _requests_per_engine(url)
    generations = [_generation(r) for r in _concurrently([lambda p=p: _completion(url, "c", p) for p in prompts])]
    assert all(g["hash"] == C.content_hash() for g in generations)
    _assert_served(model_dir, C.to_tensor(), prompts, generations)
    after = _requests_per_engine(url)
    assert all(after[e] > before.get(e, 0.0) for e in ("0", "1")), (before, after)


def test_data_parallel_more_configurations_than_rows_wait_and_are_served_right(dp_sets_server, tiny_model_dirs):
    """Six distinct scales at once, two rows (max_steering_configs 2) across both engines."""
    model_dir = str(tiny_model_dirs["qwen2"])
    url = dp_sets_server
    prompt = random_prompts(1, 40, VOCAB_SIZE, seed=65)[0]
    scales = [0.25, 0.5, 0.75, 1.25, 1.5, -1.0]
    xargs = [{"steering": "a", "steering_scale": s} for s in scales]
    generations = [
        _generation(r) for r in _concurrently([lambda x=x: _completion(url, model_dir, prompt, x) for x in xargs])
    ]
    for generation, scale in zip(generations, scales, strict=True):
        _assert_served(model_dir, scale * A.to_tensor(), [prompt], [generation])


# ---- data parallel with two API servers, global vectors --------------------------------------------------------


@pytest.fixture(scope="module")
def dp_global_server(tiny_model_dirs, vector_files, tmp_path_factory):
    flags = ["--data-parallel-size", "2", "--steering-vectors", vector_files["a"]]  # vLLM starts two API servers
    with running_server(tiny_model_dirs["qwen2"], flags, tmp_path_factory.mktemp("dp-global"), PLUGINS) as url:
        yield url


def test_several_front_ends_refuse_a_steering_choice_they_cannot_honour(dp_global_server, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    choices = [{"steering": "a"}, {"steering": "none"}, {"steering": "a", "steering_scale": 0.5}]
    choices += [{"steering_scale": 0.5}, {"steering_config": "0" * 64}]
    responses = _concurrently([lambda x=x: _completion(dp_global_server, model_dir, [1, 2, 3], x) for x in choices * 2])
    for response in responses:
        assert response.status_code == 400, response.text
        assert "--steering-sets" in response.json()["error"]["message"]


def test_put_by_file_name_is_forbidden_without_a_steering_dir(dp_global_server, vector_files):
    """Without --steering-dir the server reads no file by name, not even one next to its own vectors (b.safetensors
    lies beside a.safetensors), whichever front end answers."""
    url = dp_global_server
    for name in (vector_files["b"], "b.safetensors") * 2:
        response = requests.put(f"{url}/v1/steering", json={"file": name}, timeout=30)
        assert response.status_code == 403, response.text
        assert "start the server with --steering-dir DIR" in response.text
    statuses = _concurrently([lambda: requests.get(f"{url}/v1/steering", timeout=30)] * 4)
    assert all(s.status_code == 200 and s.json()["content_hash"] == A.content_hash() for s in statuses)


def test_several_front_ends_a_put_swaps_every_engine_and_every_front_end_says_so(dp_global_server, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    url = dp_global_server
    try:
        response = requests.put(f"{url}/v1/steering", data=B.to_bytes(), timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["content_hash"] == B.content_hash()
        prompts = random_prompts(8, 40, VOCAB_SIZE, seed=66)
        before = _requests_per_engine(url)
        responses = _concurrently([lambda p=p: _completion(url, model_dir, p) for p in prompts])
        generations = [_generation(r) for r in responses]
        assert [g["hash"] for g in generations] == [B.content_hash()] * len(prompts)  # whichever front end answered
        _assert_served(model_dir, B.to_tensor(), prompts, generations)
        after = _requests_per_engine(url)
        assert all(after[e] > before.get(e, 0.0) for e in ("0", "1")), (before, after)
        statuses = _concurrently([lambda: requests.get(f"{url}/v1/steering", timeout=30)] * 4)
        assert all(s.status_code == 200 and s.json()["content_hash"] == B.content_hash() for s in statuses)
    finally:
        requests.put(f"{url}/v1/steering", data=A.to_bytes(), timeout=60)


def test_vllm_bench_serve_through_two_front_ends_while_the_vectors_are_swapped_has_no_failure(
    dp_global_server, tiny_model_dirs, tmp_path
):
    """vLLM's own load client against both API servers (per-request sets are refused in this mode; the global
    vectors are swapped through whichever server the PUT reaches)."""
    model_dir = str(tiny_model_dirs["qwen2"])
    url, stop, puts = dp_global_server, threading.Event(), []

    def swap():
        while not stop.is_set() and len(puts) < 100:
            vectors = (A, B)[len(puts) % 2]
            puts.append(requests.put(f"{url}/v1/steering", data=vectors.to_bytes(), timeout=60).status_code)
            time.sleep(0.3)

    swapper = threading.Thread(target=swap)
    swapper.start()
    command = [sys.executable, "-m", "steering_vllm", "bench", "serve", "--base-url", url, "--model", model_dir]
    command += ["--tokenizer", model_dir, "--dataset-name", "random", "--random-input-len", "24"]
    command += ["--random-output-len", "6", "--num-prompts", "32", "--max-concurrency", "8", "--ignore-eos"]
    command += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **ENGINE_ENV})
    finally:
        stop.set()
        swapper.join(120)
        requests.put(f"{url}/v1/steering", data=A.to_bytes(), timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["completed"] == 32 and report.get("failed", 0) == 0, report
    assert len(puts) >= 2 and set(puts) == {200}
