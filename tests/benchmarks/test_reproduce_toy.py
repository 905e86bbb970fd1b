"""Table 1's arithmetic: gains over Base and the share of full fine-tuning's gain, from the runs' summaries."""

import json

import pytest

from benchmarks.reproduce_toy import _parse_lrs, final_reward, table


def test_gains_and_shares_are_relative_to_base_and_full_tune():
    rows = {
        "steering": {"lr": "0.05", "parameters": 512, "problems": 500, "after": [0.80, 0.84, 0.82],
                     "reward": [0.5, 0.6, 0.7]},
        "full": {"lr": "3e-4", "parameters": 709248, "problems": 500, "after": [0.85, 0.85, 0.85],
                 "reward": [0.7, 0.7, 0.7]},
    }  # fmt: skip
    text = table(rows, base=[0.15] * 6, base_reward=[0.2] * 6, seeds=[0, 1, 2])
    assert "| Base | 0 | | 15.0 ± 0.0 | | | 0.200 ± 0.000 |" in text
    # steering: mean 82.0, std 2.0, gain 67.0 of full's 70.0 -> 96%
    assert "| Steering | 512 | 0.05 | 82.0 ± 2.0 | +67.0 | 96% | 0.600 ± 0.100 |" in text
    assert "| Full-Tune | 709,248 | 3e-4 | 85.0 ± 0.0 | +70.0 | 100% | 0.700 ± 0.000 |" in text


def test_the_sweep_picks_by_the_last_steps_training_reward(tmp_path):
    rewards = [0.1] * 5 + [0.9] * 10 + [0.2] * 10  # high in the middle, low at the end
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward_mean": r}) + "\n"
                                                    for i, r in enumerate(rewards, 1)))  # fmt: skip
    assert final_reward(tmp_path) == pytest.approx(0.2)


def test_learning_rates_parse_per_method():
    lrs = _parse_lrs(["full=3e-4,1e-4"])
    assert lrs["full"] == ["3e-4", "1e-4"] and lrs["steering"] == ["0.1"]
    with pytest.raises(SystemExit, match="METHOD=LR"):
        _parse_lrs(["adam=1"])
