"""GET / PUT /v1/steering on a real `serve` process (VLLM_PLUGINS=steering_vllm, --api-key, --steering-dir),
compiled (vLLM's default mode) with the prefix cache on.

One server for the module; each test first puts the vectors it starts from.
"""

import json
import os
import threading
import time

import pytest
import requests
import torch
from engine_utils import hf_reference, max_abs_diff, random_prompts
from safetensors.torch import save as save_safetensors
from server_utils import completion, running_server
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS = 4
STREAMED_TOKENS = 700  # with 200 prompt tokens, within max_model_len 1024; long enough to span the swaps


def _vectors(seed):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)


A, B = _vectors(30), _vectors(31)
C = _vectors(32).select_layers(range(1, NUM_LAYERS))  # GGUF has no slot for layer 0


@pytest.fixture(scope="module")
def steering_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("steering-dir")
    A.save(directory / "a.safetensors")
    C.save(directory / "c.gguf")
    outside = B.save(directory.parent / "outside.safetensors")
    os.symlink(outside, directory / "link-out.safetensors")
    return directory


@pytest.fixture(scope="module")
def server(tiny_model_dirs, steering_dir, tmp_path_factory):
    flags = ["--steering-vectors", str(steering_dir / "a.safetensors"), "--steering-dir", str(steering_dir)]
    flags += ["--api-key", KEY]
    log_dir = tmp_path_factory.mktemp("endpoint-log")
    env = {"VLLM_PLUGINS": "steering_vllm"}
    with running_server(tiny_model_dirs["qwen2"], flags, log_dir, env, compiled=True) as url:
        yield url


def get(server) -> dict:
    response = requests.get(f"{server}/v1/steering", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def put_bytes(server, vectors_or_bytes, query="", headers=AUTH):
    body = vectors_or_bytes if isinstance(vectors_or_bytes, bytes) else vectors_or_bytes.to_bytes()
    return requests.put(f"{server}/v1/steering{query}", data=body, headers=headers, timeout=60)


def put_file(server, name, query=""):
    return requests.put(f"{server}/v1/steering{query}", json={"file": name}, headers=AUTH, timeout=60)


def test_get_reports_the_vectors_the_server_started_with(server, steering_dir):
    status = get(server)
    assert status["content_hash"] == A.content_hash()
    assert status["source"] == str(steering_dir / "a.safetensors")
    assert status["layers"] == sorted(A.vectors)
    assert status["norms"] == pytest.approx(A.norms(), rel=1e-6)
    assert (status["num_layers"], status["hidden_size"]) == (NUM_LAYERS, HIDDEN_SIZE)
    assert time.time() - 600 < status["set_at"] <= time.time()


def test_the_api_key_is_enforced(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert requests.get(f"{server}/v1/steering", headers=headers, timeout=30).status_code == 401
        assert put_bytes(server, B, headers=headers).status_code == 401
    assert get(server)["content_hash"] == A.content_hash()


def test_put_swaps_and_completions_follow_the_new_vectors(server, tiny_model_dirs):
    """A long prompt served under A, swapped to B by PUT, served again: equal to the HF reference under B."""
    model = str(tiny_model_dirs["qwen2"])
    prompt = random_prompts(1, 400, VOCAB_SIZE, seed=33)[0]  # 3 full KV blocks of 128: cached under A
    assert put_file(server, "a.safetensors").status_code == 200
    under_a = completion(server, model, prompt, 8, headers=AUTH)
    response = put_bytes(server, B)
    assert response.status_code == 200, response.text
    assert response.json()["content_hash"] == B.content_hash()
    under_b = completion(server, model, prompt, 8, headers=AUTH)
    assert under_a["headers"]["x-steering-hash"] == A.content_hash()
    assert under_b["headers"]["x-steering-hash"] == B.content_hash()
    reference = hf_reference(model, B.to_tensor(), [prompt], [under_b])[0]
    assert under_b["tokens"] == reference["argmax"]
    assert max_abs_diff(under_b["logprobs"], reference["logprobs"]) < 1e-5  # measured <= 9.5e-7 (fp32)
    assert max_abs_diff(under_b["logprobs"], under_a["logprobs"][: len(under_b["logprobs"])]) > 0.05


def test_put_by_file_name_any_format_and_scale(server, steering_dir):
    response = put_file(server, "c.gguf", query="?scale=0.5")
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["content_hash"] == C.scale(0.5).content_hash()
    assert status["source"] == "c.gguf (scale 0.5)"
    assert status["history"][-1]["content_hash"] == C.scale(0.5).content_hash()


def _nan_vectors() -> bytes:
    tensors = {"layers.1": torch.full((HIDDEN_SIZE,), float("nan"))}
    return save_safetensors(tensors, metadata={**A.metadata(), "num_layers": str(NUM_LAYERS)})


def _without_num_layers() -> bytes:
    metadata = {k: v for k, v in A.metadata().items() if k != "num_layers"}
    return save_safetensors({"layers.1": torch.ones(HIDDEN_SIZE)}, metadata=metadata)


BAD_BODIES = [
    ("wrong width", SteeringVectors.zeros(NUM_LAYERS, 64).to_bytes(), 400, "hidden_size 64 does not match"),
    ("wrong depth", SteeringVectors.zeros(NUM_LAYERS + 2, HIDDEN_SIZE).to_bytes(), 400, "num_layers 6 does not"),
    ("NaN", _nan_vectors(), 400, "'layers.1' contains NaN"),
    ("corrupt", b"\x10\x00\x00\x00\x00\x00\x00\x00not a header", 400, "not a readable safetensors file"),
    ("missing metadata key", _without_num_layers(), 400, "metadata 'num_layers' is missing"),
    ("empty", b"", 400, "empty body"),
    ("too large", b"\0" * (8 * NUM_LAYERS * HIDDEN_SIZE + (1 << 20) + 1), 413, "exceeds this model's limit"),
]
BAD_FILES = [
    ("outside", {"file": "../outside.safetensors"}, 403, "give a relative name"),
    ("absolute", {"file": "/etc/passwd"}, 403, "give a relative name"),
    ("symlink out", {"file": "link-out.safetensors"}, 403, "resolves outside the steering directory"),
    ("missing file", {"file": "nope.safetensors"}, 404, "no such file"),
    ("missing key", {"name": "a.safetensors"}, 400, '{"file": NAME}'),
    ("extra key", {"file": "a.safetensors", "scale": 2}, 400, "unknown key(s) ['scale']"),
]


@pytest.mark.parametrize("case, body, status, message", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_a_bad_body_gets_its_4xx_and_the_old_vectors_stay(server, case, body, status, message):
    assert put_bytes(server, A).status_code == 200
    response = put_bytes(server, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert get(server)["content_hash"] == A.content_hash()


@pytest.mark.parametrize("case, body, status, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_file_request_gets_its_4xx_and_the_old_vectors_stay(server, case, body, status, message):
    assert put_bytes(server, A).status_code == 200
    response = put_file(server, body["file"]) if set(body) == {"file"} else None
    if response is None:
        response = requests.put(f"{server}/v1/steering", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert get(server)["content_hash"] == A.content_hash()


def test_bad_scale_and_bad_json_are_refused(server):
    assert put_bytes(server, A, query="?scale=nan").status_code == 400
    response = requests.put(
        f"{server}/v1/steering", data=b"{not json", headers={**AUTH, "Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert get(server)["content_hash"] == A.content_hash()


def _stream(server, model, prompt, results, index, started):
    """One streaming completion; records the number of tokens (the server's usage count: a busy server may
    send several tokens in one chunk) and any error chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": STREAMED_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    tokens, errors = 0, []
    try:
        with requests.post(f"{server}/v1/completions", json={**body, "stream": True}, headers=AUTH, stream=True,
                           timeout=300) as response:  # fmt: skip
            status = response.status_code
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[len(b"data: ") :])
                if "error" in chunk:
                    errors.append(chunk["error"])
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    started[index].set()
    except requests.RequestException as e:
        status, errors = None, [repr(e)]
    results[index] = {"status": status, "tokens": tokens, "errors": errors}


def test_puts_under_load_fail_no_request_and_the_last_put_wins(server, tiny_model_dirs):
    model = str(tiny_model_dirs["qwen2"])
    assert put_bytes(server, A).status_code == 200
    prompts = random_prompts(CLIENTS, 200, VOCAB_SIZE, seed=34)
    results = [None] * CLIENTS
    started = [threading.Event() for _ in range(CLIENTS)]
    threads = [
        threading.Thread(target=_stream, args=(server, model, p, results, i, started)) for i, p in enumerate(prompts)
    ]
    for thread in threads:
        thread.start()
    assert all(event.wait(120) for event in started)
    sequence = [(B, None), ("a.safetensors", None), (C, "?scale=2"), (B, None)]
    responses = []
    for vectors, query in sequence:
        if isinstance(vectors, str):
            responses.append(put_file(server, vectors))
        else:
            responses.append(put_bytes(server, vectors, query=query or ""))
        time.sleep(0.2)
    streaming_during_puts = sum(thread.is_alive() for thread in threads)
    for thread in threads:
        thread.join(300)
    assert [r.status_code for r in responses] == [200] * len(sequence), [r.text for r in responses]
    assert streaming_during_puts == CLIENTS, "the streams ended before the swaps: the test proves nothing"
    assert results == [{"status": 200, "tokens": STREAMED_TOKENS, "errors": []}] * CLIENTS
    expected = [B.content_hash(), A.content_hash(), C.scale(2).content_hash(), B.content_hash()]
    assert [r.json()["content_hash"] for r in responses] == expected
    status = get(server)
    assert status["content_hash"] == B.content_hash()
    assert [h["content_hash"] for h in status["history"][-len(sequence) :]] == expected
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_concurrent_puts_from_several_clients_each_land_whole(server, tiny_model_dirs):
    """Clients PUT at the same moment: each PUT succeeds and answers with its own vectors (PUTs are serialised),
    and afterwards the engine serves exactly one of them, the one GET reports."""
    candidates = [_vectors(40 + i) for i in range(CLIENTS)]
    barrier = threading.Barrier(CLIENTS)
    responses = [None] * CLIENTS

    def client(index):
        barrier.wait()
        responses[index] = put_bytes(server, candidates[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [r.status_code for r in responses] == [200] * CLIENTS, [r.text for r in responses]
    assert [r.json()["content_hash"] for r in responses] == [c.content_hash() for c in candidates]
    status = get(server)
    swapped = [h["content_hash"] for h in status["history"][-CLIENTS:]]
    assert sorted(swapped) == sorted(c.content_hash() for c in candidates)
    assert status["content_hash"] == swapped[-1]
    winner = next(c for c in candidates if c.content_hash() == status["content_hash"])
    model = str(tiny_model_dirs["qwen2"])
    prompt = random_prompts(1, 300, VOCAB_SIZE, seed=35)[0]
    served = completion(server, model, prompt, 8, headers=AUTH)
    assert served["headers"]["x-steering-hash"] == winner.content_hash()
    reference = hf_reference(model, winner.to_tensor(), [prompt], [served])[0]
    assert served["tokens"] == reference["argmax"]
    assert max_abs_diff(served["logprobs"], reference["logprobs"]) < 1e-5  # measured <= 9.5e-7 (fp32)
