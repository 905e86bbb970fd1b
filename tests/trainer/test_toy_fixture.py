"""The shipped toy base models (fixtures/toy-model and fixtures/toy-misused, made by `python -m trainer.toy.pretrain`)
load in the real engine and reproduce their recorded greedy accuracy on a held-out slice: the first half-knows its
task (does not box), the second boxes but misuses its skill, and fails the absent world's problems."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_utils import ENGINE_ENV

pytestmark = [pytest.mark.engine, pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FIXTURE = FIXTURES / "toy-model"


def _greedy_first_100(model: Path, benchmarks: dict[str, Path], output: Path) -> list[dict]:
    command = [sys.executable, "-m", "trainer.eval", "--model", str(model), "--benchmarks",
               ",".join(f"{name}={path}" for name, path in benchmarks.items()), "--temperature", "0",
               "--max-new-tokens", "64", "--limit", "100", "--output-dir", str(output), "--engine",
               "{enforce_eager: true, gpu_memory_utilization: 0.05, max_model_len: 512}"]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output / "results.json").read_text())[0]["benchmarks"]


def test_the_fixture_reproduces_its_recorded_base_accuracy(tmp_path):
    recorded = json.loads((FIXTURE / "base_accuracy.json").read_text())
    measured = _greedy_first_100(FIXTURE, {"toy": FIXTURE / "data" / "test.jsonl"}, tmp_path)[0]
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


def test_the_misused_worlds_model_boxes_but_misuses_and_fails_the_absent_world(tmp_path):
    misused = FIXTURES / "toy-misused"
    recorded = json.loads((misused / "base_accuracy.json").read_text())["greedy_pass@1_first_100"]
    tests = {world: FIXTURES / f"toy-{world}" / "data" / "test.jsonl" for world in ("misused", "absent")}
    measured = {b["benchmark"]: b for b in _greedy_first_100(FIXTURES / "toy-absent", tests, tmp_path)}
    for world, result in measured.items():  # two problems of the hundred may flip with another CPU's rounding
        assert abs(result["mean"] - recorded[world]) <= 2.0, (world, result["seeds"][0]["statuses"])
    assert 20 <= measured["misused"]["mean"] <= 50  # often wrong ...
    assert measured["misused"]["seeds"][0]["statuses"].get("no_boxed", 0) <= 2  # ... though it boxes its answers
    assert measured["absent"]["mean"] <= 5  # near zero where the operation is new to it
