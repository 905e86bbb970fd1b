"""`trainer.eval --vectors ... --include-base` on the toy fixture with the vectors command 1 trained, both setups in
one engine: each scores what the trainer's own held-out evaluation measured (the vectors far above the base)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_utils import ENGINE_ENV

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MODEL, TRAINED = ROOT / "fixtures" / "toy-model", ROOT / "fixtures" / "toy-steering"


def test_the_vectors_and_the_base_in_one_engine_each_score_what_was_measured_alone(tmp_path):
    """Two setups, one engine start: the trained vectors as a per-request set, the base model as "none"."""
    recorded = json.loads((TRAINED / "trained.json").read_text())
    command = [sys.executable, "-m", "trainer.eval", "--model", str(MODEL), "--include-base",
               "--vectors", f"trained={TRAINED / 'steering_vectors.safetensors'}",
               "--benchmarks", f"toy={MODEL / 'data' / 'test.jsonl'}", "--temperature", "0", "--max-new-tokens", "64",
               "--limit", "200", "--output-dir", str(tmp_path),
               "--engine", "{gpu_memory_utilization: 0.05, max_model_len: 512}"]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row["label"]: row["benchmarks"][0]["mean"] for row in json.loads((tmp_path / "results.json").read_text())}
    assert sorted(rows) == ["base", "trained"]
    # the same engine mode as the trainer (compiled); another CPU's rounding may flip a rare near-tie
    assert abs(rows["trained"] - recorded["eval_accuracy_after_first_200"]) <= 1.5
    assert abs(rows["base"] - recorded["eval_accuracy_before_first_200"]) <= 1.5
    assert rows["trained"] - rows["base"] > 50  # the vectors are what moved it
