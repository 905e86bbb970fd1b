"""`reproduce_toy --sweep-engine` end to end, small: a steering run in a process of its own and as a sweep, on the
shipped toy model (2 steps, eager engine); its recorded tables hold both ways and agree on the held-out scores."""

import json

import pytest
from engine_utils import ENGINE_ENV  # noqa: F401  (sets the engine's environment for the trainer processes)

from benchmarks import reproduce_toy

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ENGINE = "{gpu_memory_utilization: 0.05, max_model_len: 512, enforce_eager: true}"
SMALL = ["--steps", "2", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--eval_prompts", "4",
         "--eval_every", "0", "--engine", ENGINE]  # fmt: skip


def test_the_same_runs_one_process_each_and_as_one_sweep(tmp_path, results_dir):
    output = tmp_path / "out"
    reproduce_toy.main(["--sweep-engine", "--seeds", "0", "--lr", "steering=0.05", "--output", str(output),
                        "--", *SMALL])  # fmt: skip
    cost = json.loads((results_dir / "toy_sweep_engine_boxing.json").read_text())
    one, sweep, ratio = cost["rows"]
    assert [one["way"], sweep["way"]] == ["one run at a time", "one sweep"] and one["runs"] == sweep["runs"] == 1
    for row in (one, sweep):
        assert row["wall_s"] > row["generate_s"] + row["learn_s"] > 0 and row["peak_gib"] > 0.1
    assert ratio["wall_s"] == pytest.approx(one["wall_s"] / sweep["wall_s"])
    held_out = json.loads((results_dir / "toy_sweep_engine_boxing_held_out.json").read_text())
    assert [row["lr"] for row in held_out["rows"]] == ["0.05"]
    assert all(row["alone"] == row["swept"] and row["largest_gap"] == 0.0 for row in held_out["rows"])
    runs = json.loads((output / "sweep-engine" / "sweep" / "sweep.json").read_text())
    assert [r["run"] for r in runs] == ["learning_rate=0.05,seed=0"]
