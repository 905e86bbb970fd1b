"""Per-request steering under hostile and heavy traffic, on one real `serve` process (tiny Qwen2, fp32, eager,
--api-key, --max-steering-configs 4), loopback only, every loop bounded in count and time:

- a fuzz of every steering route and of completions carrying ``vllm_xargs``: every answer is a 4xx in vLLM's
  error shape or a 200 with the vectors a local ``SteeringSets`` (the same resolution, no engine) says the
  request asked for; the engine stays healthy, refused calls change no set, memory stays bounded;
- vLLM's own load client (``vllm bench serve --lora-modules a b``: a set per request in ``model``) with zero
  failed requests while set ``a`` is replaced over and over;
- a soak: clients on different sets and scales while sets are added, replaced and removed, every completion
  checked against its own vectors' HF reference, and no table row held once idle.

STEERING_SOAK_SECONDS sets the soak's length (default 15 s, at most 1,500 completions a client).
"""

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
import torch
from engine_utils import ENGINE_ENV, hf_reference, max_abs_diff, random_prompts
from server_utils import running_server
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors
from steering_vllm.per_request.sets import SteeringSets

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CONFIGS = 4
TOLERANCE = 1e-5  # logprobs against the HF reference; measured <= 1e-6 (fp32)
SOAK_SECONDS = float(os.environ.get("STEERING_SOAK_SECONDS", 15))


def _vectors(seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * scale)


A, B = _vectors(70), _vectors(71)
VERSIONS = [_vectors(72 + i) for i in range(6)]  # what the mutators put, in turn


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("load-sets")
    sets = [f"a={A.save(directory / 'a.safetensors')}", f"b={B.save(directory / 'b.safetensors')}"]
    flags = ["--steering-sets", *sets, "--max-steering-configs", str(MAX_CONFIGS), "--api-key", KEY]
    env = {"VLLM_PLUGINS": "steering_vllm"}
    with running_server(tiny_model_dirs["qwen2"], flags, tmp_path_factory.mktemp("load-log"), env) as url:
        yield url


def _status(url) -> dict:
    response = requests.get(f"{url}/v1/steering", headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _set_hashes(status) -> dict:
    return {"default": status["default"]["content_hash"], **{n: s["content_hash"] for n, s in status["sets"].items()}}


def _rows_in_use(status) -> int:
    return sum(entry["requests"] for worker in status["workers"] for entry in worker["rows"].values())


def _server_memory(url) -> int:
    """Resident bytes of the serve process and its children (API server, engine core, worker)."""
    port = int(url.rsplit(":", 1)[1])
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
            process = psutil.Process(connection.pid)
            return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    raise AssertionError(f"no process listens on {port}")


def _completion_body(model, prompt, xargs, max_tokens=3) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
    body.update(ignore_eos=True, return_tokens_as_token_ids=True)
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return body


def _generation(response) -> dict:
    logprobs = response.json()["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    return {"tokens": tokens, "logprobs": logprobs["token_logprobs"], "hash": response.headers.get("x-steering-hash")}


class References:
    """HF-hooks references, one model load per distinct table."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.pending: dict[str, tuple[torch.Tensor | None, list]] = {}

    def expect(self, table, prompt, generation) -> None:
        key = "none" if table is None else SteeringVectors.from_tensor(table).content_hash()
        self.pending.setdefault(key, (table, []))[1].append((prompt, generation))

    def check(self) -> int:
        checked = 0
        for table, cases in self.pending.values():
            prompts, generations = [c[0] for c in cases], [c[1] for c in cases]
            references = hf_reference(self.model_dir, table, prompts, generations)
            for generation, reference in zip(generations, references, strict=True):
                assert generation["tokens"] == reference["argmax"]
                assert max_abs_diff(generation["logprobs"], reference["logprobs"]) < TOLERANCE
                checked += 1
        return checked


# ---- fuzz ------------------------------------------------------------------------------------------------------

NAMES = ["a", "b", "none", "NONE", "zzz", "", "ä", "名前", "..", "a/../b", "a b", "a\x00", "x" * 300, "%2e%2e", "-"]
SCALES = [1.0, -0.5, 0, 2, "0.5", None, True, [1.0], {"x": 1}, 1e38, -1e38, 1e-45, "nan"]


def _hostile_choice(rng: random.Random):
    kind = rng.randrange(7)
    if kind == 0:  # names and scales of every type
        return {
            "steering": rng.choice([*NAMES, 3, 1.5, None, {"a": 1}, [], [[]]]),
            "steering_scale": rng.choice(SCALES),
        }
    if kind == 1:  # lists, some matched, some not
        names = [rng.choice(NAMES[:5]) for _ in range(rng.randrange(1, 5))]
        scales = [rng.choice([1.0, -2.0, 0.25, "x", None]) for _ in range(len(names) + rng.choice([0, 0, 1, -1]))]
        return {"steering": names, "steering_scale": scales}
    if kind == 2:  # hundreds of names in one choice
        count = rng.choice([200, 500])
        return {
            "steering": ["a", "b"] * (count // 2),
            "steering_scale": [rng.choice([1.0, 1e36]) for _ in range(count)],
        }
    if kind == 3:
        return {"steering_scale": 0.5}
    if kind == 4:  # a forged configuration key, which the front end must overwrite
        return {"steering": "a", "steering_config": "0" * 64}
    if kind == 5:
        return {"steering": "a", "steering_scale": rng.uniform(-3, 3)}
    return None


def _raw_http(url, request: bytes) -> int:
    """Send raw bytes (framing an HTTP client would not send); the status code of the answer, 0 if none."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _hostile_put(rng: random.Random, valid: bytes):
    """(path, headers, body) for a PUT to a steering route."""
    path = rng.choice(["/v1/steering"] + [f"/v1/steering/sets/{n}" for n in ["fz", "fz2", "ä", "..", "none", "a%2Fb"]])
    kind = rng.randrange(7)
    headers = dict(AUTH)
    if kind == 0:
        body = rng.randbytes(rng.randrange(0, 3000))
    elif kind == 1:
        body = valid[: rng.randrange(0, len(valid))]  # truncated
    elif kind == 2:
        body = bytearray(valid)
        body[rng.randrange(8, 200)] ^= 0xFF  # a flipped byte in the header
        body = bytes(body)
    elif kind == 3:
        headers["Content-Type"] = "application/json"
        body = rng.choice([valid, b'{"file": 5}', b'{"file": "../../etc/passwd"}', b'{"file": "/etc/passwd"}'])
        body = rng.choice([body, b"[" * 60000, b'{"file": "a", "x": 1}', '{"file": "ä"}'.encode()])
    elif kind == 4:
        headers["Content-Type"] = rng.choice(["text/plain", "application/json; charset=utf-16", "multipart/form-data"])
        body = valid
    elif kind == 5:
        body, path = valid, path + rng.choice(["?scale=nan", "?scale=inf", "?scale=1e309", "?scale=-1e38", "?scale=x"])
    else:
        headers = {}  # no API key
        body = valid
    return path, headers, body


def test_a_fuzz_of_the_steering_routes_and_choices_gets_4xx_or_the_right_vectors(server, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    rng = random.Random(torch.initial_seed())
    books = SteeringSets(NUM_LAYERS, HIDDEN_SIZE, MAX_CONFIGS)  # the oracle: the front end's resolution, no engine
    books.put("a", A)
    books.put("b", B)
    expected_sets = _set_hashes(_status(server))
    memory_before = _server_memory(server)
    valid = VERSIONS[0].to_bytes()
    prompt = random_prompts(1, 20, VOCAB_SIZE, seed=80)[0]
    references = References(model_dir)
    counts = {"requests": 0, "4xx": 0, "router": 0, "200": 0, "raw": 0}

    def answered(response, accepted):
        counts["requests"] += 1
        if response.status_code == 200:
            counts["200"] += 1
            accepted()
            return
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
        counts["4xx"] += 1
        if response.status_code in (404, 405) and "detail" in response.json():
            counts["router"] += 1  # no such route (a name with '/'): Starlette's router answers, not a handler
            return
        error = response.json()["error"]
        if response.status_code == 401:  # vLLM's API-key middleware answers {"error": "Unauthorized"}
            assert error == "Unauthorized"
            return
        assert isinstance(error, dict), response.text[:300]
        assert set(error) >= {"message", "type", "code"} and error["code"] == response.status_code, error

    for _ in range(120):  # completions choosing vectors
        xargs = _hostile_choice(rng)
        model = rng.choice([model_dir, model_dir, "a", "b", "zzz", "ä"])
        body = _completion_body(model, prompt, xargs)
        response = requests.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=120)

        def accepted(xargs=xargs, model=model, response=response):
            choice = dict(xargs or {})
            assert model in (model_dir, "a", "b"), f"model {model!r} was served"
            if model != model_dir:  # a set named in `model` must agree with vllm_xargs
                assert choice.setdefault("steering", model) == model, f"model {model!r} served with {xargs}"
            configuration = books.resolve(choice)  # raises if the server accepted what the oracle refuses
            generation = _generation(response)
            assert generation["hash"] == configuration.content_hash
            references.expect(None if configuration.is_zero else configuration.table, prompt, generation)

        answered(response, accepted)
    for _ in range(120):  # PUT / DELETE on every steering route
        path, headers, body = _hostile_put(rng, valid)
        if rng.random() < 0.15:
            response = requests.delete(f"{server}{path}", headers=headers, timeout=60)
        else:
            response = requests.put(f"{server}{path}", data=body, headers=headers, timeout=60)

        def accepted(path=path, response=response):
            status = response.json()
            expected_sets.clear()
            expected_sets.update(_set_hashes(status))  # an accepted call may change sets: follow it

        answered(response, accepted)
    for request in [  # framing: huge, negative and missing lengths, a body cut short
        b"PUT /v1/steering/sets/fz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\n"
        b"Content-Length: 999999999999\r\n\r\nabc",
        b"PUT /v1/steering HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\nContent-Length: -5\r\n\r\nabc",
        b"PUT /v1/steering HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\nContent-Length: 4000\r\n\r\nab",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n{}",
    ]:
        status = _raw_http(server, request)
        assert status == 0 or 400 <= status < 500, status
        counts["raw"] += 1
    # A flood of distinct configurations: more than the rows, all at once; each waits for a row and is right.
    scales = [0.1 * (i + 1) for i in range(24)]
    results = [None] * len(scales)

    def flood(i):
        body = _completion_body(model_dir, prompt, {"steering": "b", "steering_scale": scales[i]}, max_tokens=2)
        results[i] = requests.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=300)

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(len(scales))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    for scale, response in zip(scales, results, strict=True):
        assert response.status_code == 200, response.text
        generation = _generation(response)
        table = books.resolve({"steering": "b", "steering_scale": scale}).table
        assert generation["hash"] == SteeringVectors.from_tensor(table).content_hash()
        references.expect(table, prompt, generation)
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
    status = _status(server)
    assert _set_hashes(status) == expected_sets  # refused calls changed nothing
    assert status["live_configurations"] == {} and _rows_in_use(status) == 0
    checked = references.check()
    growth = _server_memory(server) - memory_before
    print(f"fuzz: {counts}, flood {len(scales)}, {checked} checked against HF, memory growth {growth / 2**20:.0f} MiB")
    assert growth < 512 * 2**20
    for name in set(expected_sets) - {"default", "a", "b"}:  # sets the fuzz added
        requests.delete(f"{server}/v1/steering/sets/{name}", headers=AUTH, timeout=60)


# ---- vLLM's own load client --------------------------------------------------------------------------------------


def test_vllm_bench_serve_names_sets_as_lora_modules_with_no_failure_while_a_set_is_replaced(
    server, tiny_model_dirs, tmp_path
):
    model_dir = str(tiny_model_dirs["qwen2"])
    stop, puts = threading.Event(), []

    def replace_a():
        i = 0
        while not stop.is_set() and i < 200:
            vectors = VERSIONS[i % len(VERSIONS)]
            puts.append(requests.put(f"{server}/v1/steering/sets/a", data=vectors.to_bytes(), headers=AUTH, timeout=60))
            i += 1
            time.sleep(0.2)

    replacer = threading.Thread(target=replace_a)
    replacer.start()
    command = [sys.executable, "-m", "steering_vllm", "bench", "serve", "--base-url", server, "--model", model_dir]
    command += ["--tokenizer", model_dir, "--dataset-name", "random", "--random-input-len", "24"]
    command += ["--random-output-len", "6", "--num-prompts", "48", "--max-concurrency", "8", "--lora-modules", "a", "b"]
    command += ["--ignore-eos", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **ENGINE_ENV, "OPENAI_API_KEY": KEY},
        )
    finally:
        stop.set()
        replacer.join(120)
        requests.put(f"{server}/v1/steering/sets/a", data=A.to_bytes(), headers=AUTH, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["completed"] == 48 and report.get("failed", 0) == 0, report
    assert len(puts) >= 2 and all(p.status_code == 200 for p in puts)
    print(f"bench serve: {report['completed']} completed, 0 failed, {len(puts)} replacements of set 'a' meanwhile")


# ---- soak ------------------------------------------------------------------------------------------------------


def test_a_soak_of_clients_on_changing_sets_gets_every_completion_right_and_leaks_no_row(server, tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    names = ["s0", "s1", "s2"]
    versions: dict[str, list[SteeringVectors]] = {name: [] for name in names}  # every version a name ever had
    lock = threading.Lock()
    for i, name in enumerate(names):
        versions[name].append(VERSIONS[i])
        response = requests.put(
            f"{server}/v1/steering/sets/{name}", data=VERSIONS[i].to_bytes(), headers=AUTH, timeout=60
        )
        assert response.status_code == 200, response.text
    prompts = random_prompts(3, 24, VOCAB_SIZE, seed=81)
    deadline = time.monotonic() + SOAK_SECONDS
    completions, refusals, failures = [], [], []

    def client(seed):
        rng = random.Random(seed)
        while time.monotonic() < deadline and len(completions) < 6000:
            name, scale, p = rng.choice(names), rng.choice([1.0, 0.5, -1.0]), rng.randrange(len(prompts))
            body = _completion_body(model_dir, prompts[p], {"steering": name, "steering_scale": scale}, max_tokens=4)
            response = requests.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=300)
            if response.status_code == 200:
                completions.append((name, scale, p, _generation(response)))
            elif response.status_code == 400 and "unknown steering set" in response.text:
                refusals.append(name)  # removed meanwhile: a clear refusal, never other vectors
            else:
                failures.append((response.status_code, response.text[:300]))

    def mutator():
        rng, i = random.Random(7), 0
        while time.monotonic() < deadline:
            name, i = rng.choice(names), i + 1
            if rng.random() < 0.25:
                requests.delete(f"{server}/v1/steering/sets/{name}", headers=AUTH, timeout=60)
            else:
                vectors = VERSIONS[i % len(VERSIONS)].scale(rng.choice([1.0, 2.0]))
                with lock:
                    versions[name].append(vectors)
                url = f"{server}/v1/steering/sets/{name}"
                response = requests.put(url, data=vectors.to_bytes(), headers=AUTH, timeout=60)
                if response.status_code != 200:
                    failures.append((response.status_code, response.text[:300]))
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)] + [threading.Thread(target=mutator)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SOAK_SECONDS + 600)
    assert not failures, failures[:5]
    references = References(model_dir)
    for name, scale, p, generation in completions:
        tables = {v.scale(scale).content_hash(): v.scale(scale).to_tensor() for v in versions[name]}
        assert generation["hash"] in tables, f"{name} x {scale}: served {generation['hash']}, not a version of it"
        references.expect(tables[generation["hash"]], prompts[p], generation)
    checked = references.check()
    status = _status(server)
    assert status["live_configurations"] == {} and _rows_in_use(status) == 0  # idle: no row held
    for worker in status["workers"]:
        assert all(entry["buffer_hash"] == entry["content_hash"] for entry in worker["rows"].values())
    print(
        f"soak {SOAK_SECONDS:.0f} s: {len(completions)} completions ({checked} checked against HF), "
        f"{len(refusals)} refused (set removed), {sum(len(v) for v in versions.values())} versions put, 0 failures"
    )
    assert len(completions) >= 20
