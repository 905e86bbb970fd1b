"""The trainer and the evaluator on the real model and real files (the real-model fixture): `python -m
trainer.rloo` on SmolLM2-135M-Instruct with GSM8K's training problems, its chat template and Math-Verify (fp32),
then `python -m trainer.eval` on held-out GSM8K problems with the trained vectors and the base model side by
side in one engine."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from engine_utils import ENGINE_ENV

from steering_vllm import SteeringVectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]

# logprob_gap, fp32 engine and learner on the real model: measured 5e-6 (4 prompts x 4 samples, 128 new tokens)
CANARY_TOLERANCE = 5e-5


def _run(command, timeout=900):
    result = subprocess.run(command, env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.fixture(scope="module")
def trained(real_fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-rloo")
    config = {
        "model": real_fixture["model"],
        "output_dir": str(root / "run"),
        "train_data": real_fixture["gsm8k_train"],
        "question_field": "question",
        "answer_field": "answer",
        "dtype": "float32",
        "steps": 2,
        "prompts_per_step": 2,
        "samples_per_prompt": 2,
        "max_new_tokens": 24,
        "micro_batch_size": 4,
        "learning_rate": 0.01,
        "warmup_steps": 0,
        "save_every": 1,
        # eager: the canary compares engine and learner, the same either way (the compiled engine on this model
        # is test_real_model_engine.py's)
        "engine": {"enforce_eager": True, "gpu_memory_utilization": 0.05, "max_model_len": 1024},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    _run([sys.executable, "-m", "trainer.rloo", "--config", str(root / "config.yaml")])
    return root / "run"


def test_training_on_the_real_model_keeps_engine_and_learner_in_step(trained):
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert max(m["logprob_gap"] for m in metrics) < CANARY_TOLERANCE
    vectors = SteeringVectors.load(trained / "steering_vectors.safetensors")
    assert (vectors.num_layers, vectors.hidden_size) == (30, 576)


def test_eval_scores_the_trained_vectors_and_the_base_on_held_out_gsm8k_in_one_engine(trained, real_fixture, tmp_path):
    command = [sys.executable, "-m", "trainer.eval", "--model", real_fixture["model"], "--include-base",
               "--vectors", f"trained={trained / 'steering_vectors.safetensors'}",
               "--benchmarks", f"gsm8k={real_fixture['gsm8k_heldout']}", "--question-field", "question",
               "--answer-field", "answer", "--temperature", "0", "--max-new-tokens", "24", "--limit", "4",
               "--dtype", "float32", "--output-dir", str(tmp_path),
               "--engine", "{enforce_eager: true, gpu_memory_utilization: 0.05, max_model_len: 1024}"]  # fmt: skip
    _run(command)
    rows = {row["label"]: row["benchmarks"][0] for row in json.loads((tmp_path / "results.json").read_text())}
    assert sorted(rows) == ["base", "trained"]
    for result in rows.values():
        assert result["problems"] == 4 and result["metric"] == "pass@1"
        assert sum(result["seeds"][0]["statuses"].values()) == 4  # every answer was scored by Math-Verify
