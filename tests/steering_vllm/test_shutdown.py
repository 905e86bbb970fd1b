"""SIGTERM and Ctrl-C leave no engine process behind: `steering-vllm serve` (steered) and `python -m trainer.rloo`.

Each process starts in its own session, so that Ctrl-C can go to its whole process group as a terminal sends it.
The processes it started (engine core, worker, resource tracker, reward workers) are recorded before the signal;
after it, the process must exit and every one of them must be gone.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch
from engine_utils import ENGINE_ENV
from server_utils import ENGINE_FLAGS, SERVE, free_port
from tiny_models import HIDDEN_SIZE, NUM_LAYERS

from steering_vllm import SteeringVectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXIT_S = 60  # measured: the server exits in 0.5-0.7 s; the trainer in 7.5-9 s (vLLM force-kills its engine core)
START_S = 300
# `kill` (SIGTERM to the process alone) and Ctrl-C (SIGINT to the whole process group)
STOPS = pytest.mark.parametrize(
    "signum, group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["kill", "Ctrl-C"]
)


@pytest.fixture
def start():
    """Starts a command in a session of its own (its process group is what Ctrl-C in a terminal reaches); at
    teardown kills whatever is left of that group, so that a failed test leaves nothing running either."""
    processes = []

    def start(command: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, **ENGINE_ENV}
        env.pop("VLLM_LOGGING_LEVEL", None)
        with open(log, "w") as out:
            processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                              start_new_session=True))  # fmt: skip
        return processes[-1]

    yield start
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_for(ready, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while not ready():
        assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not ready in {START_S} s"
        time.sleep(0.2)


def _children(process: subprocess.Popen) -> dict[psutil.Process, str]:
    children = {}
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            children[child] = child.name()
        except psutil.NoSuchProcess:
            pass
    return children


def _has_engine(process: subprocess.Popen) -> bool:
    return "VLLM::EngineCore" in _children(process).values()


def _running(processes) -> list[psutil.Process]:
    running = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def _interrupt(process: subprocess.Popen, signum: int, group: bool, log: Path) -> int:
    """Send ``signum`` (to the process group: Ctrl-C); assert that the process and all it started are gone."""
    children = _children(process)
    assert "VLLM::EngineCore" in children.values(), children  # else the check below would pass vacuously
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    try:
        returncode = process.wait(timeout=EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_S} s after {signal.Signals(signum).name}:\n{log.read_text()[-4000:]}")
    deadline = time.monotonic() + EXIT_S
    while (left := _running(children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind: {[(p.pid, children[p]) for p in left]}"
    return returncode


@pytest.fixture(scope="module")
def vectors_file(tmp_path_factory):
    g = torch.Generator().manual_seed(7)
    vectors = SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)
    return vectors.save(tmp_path_factory.mktemp("shutdown") / "v.safetensors")


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@STOPS
def test_the_server_stops_with_its_engine_mid_stream(start, tiny_model_dirs, vectors_file, tmp_path, signum, group):
    model, port, log = str(tiny_model_dirs["qwen2"]), free_port(), tmp_path / "server.log"
    flags = ["--enforce-eager", "--steering-vectors", str(vectors_file), "--port", str(port)]
    process = start([*SERVE, model, *ENGINE_FLAGS, *flags], log)
    url = f"http://127.0.0.1:{port}"
    _wait_for(lambda: _healthy(url), process, log)
    request = {"model": model, "prompt": [1, 2, 3], "max_tokens": 900, "ignore_eos": True, "stream": True}
    with requests.post(f"{url}/v1/completions", json=request, stream=True, timeout=60) as stream:
        assert next(stream.iter_lines()).startswith(b"data: ")  # the engine is generating
        returncode = _interrupt(process, signum, group, log)
    assert returncode == 0, log.read_text()[-4000:]  # vLLM's server exits cleanly on both


def _trainer(start, output_dir: Path, log: Path) -> subprocess.Popen:
    """The README's toy run, made endless (it is interrupted) and quick to start: eager engine, no evaluation."""
    overrides = {"output_dir": str(output_dir), "steps": "100000", "eval_data": "", "prompts_per_step": "4",
                 "engine": "{enforce_eager: true, gpu_memory_utilization: 0.05, max_model_len: 512}"}  # fmt: skip
    command = [sys.executable, "-m", "trainer.rloo", "--config", "configs/toy.yaml"]
    return start(command + [arg for key, value in overrides.items() for arg in (f"--{key}", value)], log)


@STOPS
def test_the_trainer_stops_with_its_engine_while_it_trains(start, tmp_path, signum, group):
    log = tmp_path / "trainer.log"
    process = _trainer(start, tmp_path / "run", log)
    _wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), process, log)  # a step is done
    assert _interrupt(process, signum, group, log) == 128 + signum, log.read_text()[-4000:]


def test_ctrl_c_stops_the_trainer_while_its_engine_starts(start, tmp_path):
    """vLLM 0.32 swallows a KeyboardInterrupt raised while it waits for its engine core to start, then waits
    10 min for that engine, which Ctrl-C killed: the trainer turns Ctrl-C into SystemExit."""
    log = tmp_path / "trainer.log"
    process = _trainer(start, tmp_path / "run", log)
    _wait_for(lambda: _has_engine(process), process, log)
    assert _interrupt(process, signal.SIGINT, True, log) == 128 + signal.SIGINT, log.read_text()[-4000:]
