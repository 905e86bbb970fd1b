"""Running ``python -m steering_vllm serve`` (vLLM's own OpenAI server) in a subprocess for tests.

A server has one API server and one engine unless its flags ask for more (test_scale_out.py starts several API
servers and data-parallel engines); tests that read one front end's state rely on that."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from engine_utils import ENGINE_ENV

SERVE = [sys.executable, "-m", "steering_vllm", "serve"]
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.05"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    model_dir, flags: list[str], log_dir: Path, env: dict[str, str | None] | None = None, compiled: bool = False
):
    """Start the server, wait until /health answers, yield its URL; the log is shown if it dies.

    ``env`` adds variables to the environment; a value of None removes one. ``compiled``: vLLM's default
    mode (torch.compile, ~45 s to start) instead of ``--enforce-eager`` (~20 s).
    """
    environment = {**os.environ, **ENGINE_ENV}
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    port = free_port()
    log = open(log_dir / "server.log", "w+")
    process = subprocess.Popen(
        [
            *SERVE,
            str(model_dir),
            *ENGINE_FLAGS,
            *([] if compiled else ["--enforce-eager"]),
            *flags,
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment,
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
        assert process.poll() is None, "the server died during the test"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def completion(url: str, model: str, prompt: list[int], max_tokens: int, headers: dict | None = None) -> dict:
    """Greedy completion of token ids: {'tokens', 'logprobs', 'headers'}."""
    response = requests.post(
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        },
        headers=headers,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    return {"tokens": tokens, "logprobs": logprobs["token_logprobs"], "headers": response.headers}
