"""The shipped toy base model (fixtures/toy-model, made by `python -m trainer.toy_pretrain`) loads in the real
engine and reproduces its recorded greedy accuracy on a held-out slice: it half-knows the task."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_utils import ENGINE_ENV

pytestmark = [pytest.mark.engine, pytest.mark.slow]

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "toy-model"


def test_the_fixture_reproduces_its_recorded_base_accuracy(tmp_path):
    recorded = json.loads((FIXTURE / "base_accuracy.json").read_text())
    command = [sys.executable, "-m", "trainer.eval", "--model", str(FIXTURE), "--benchmarks",
               f"toy={FIXTURE / 'data' / 'test.jsonl'}", "--temperature", "0", "--max-new-tokens", "64",
               "--limit", "100", "--output-dir", str(tmp_path), "--engine",
               "{enforce_eager: true, gpu_memory_utilization: 0.05, max_model_len: 512}"]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads((tmp_path / "results.json").read_text())[0]["benchmarks"][0]
    # Greedy decoding in fp32 is deterministic on one machine; another CPU's kernels may round differently and
    # flip a rare near-tie, so allow two problems of the hundred.
    assert abs(measured["mean"] - recorded["greedy_pass@1_first_100"]) <= 2.0, measured["seeds"][0]["statuses"]
    statuses = measured["seeds"][0]["statuses"]
    assert 5 <= measured["mean"] <= 30  # low at first ...
    assert statuses["no_boxed"] > statuses["wrong"]  # ... mostly because it does not box its (often right) answer


def test_steering_training_on_the_fixture_raises_the_reward(tmp_path):
    """configs/toy.yaml, shortened: with Math-Verify rewards the vectors must teach the model to box its answers.
    A wrong-signed gradient lowers the reward; a sync that never reaches the engine leaves it flat."""
    root = FIXTURE.parents[1]
    command = [sys.executable, "-m", "trainer.rloo", "--config", str(root / "configs" / "toy.yaml"),
               "--output_dir", str(tmp_path / "run"), "--steps", "30", "--eval_data", "null",
               "--model", str(FIXTURE), "--train_data", str(FIXTURE / "data" / "train.jsonl"),
               "--engine", "{enforce_eager: true, gpu_memory_utilization: 0.05, max_model_len: 512}"]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rewards = [
        json.loads(line)["reward_mean"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards  # measured: 0.17 -> 0.47
