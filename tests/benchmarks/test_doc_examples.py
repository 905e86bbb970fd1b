"""What the benchmarks behind the docs' examples read from trainer outputs: the real-model premise (the last number
a completion writes, GSM8K's gold, boxed and right counts), command 1 (a run's phase medians, trainer.eval's statuses
as a table row), a logit lens result's table rows and the canary's gaps."""

import pytest

from benchmarks.quick_start import eval_rows, step_phases
from benchmarks.real_premise import gsm8k_gold, last_number, sample_counts


def test_last_number_drops_separators_and_a_trailing_point_zero():
    assert last_number("She pays 1,250 dollars, then 3.0 more: 1253.0") == "1253"
    assert last_number("12 - 5 = -7") == "-7"
    assert last_number("2.5 hours") == "2.5"
    assert last_number("no digits") is None


def test_sample_counts_boxed_and_last_number_against_the_gold_after_hashes():
    assert gsm8k_gold("She sells 9 eggs.\n#### 1,018") == "1018"
    samples = [{"gold": "9 * 2 = 18\n#### 18", "completions": ["So \\boxed{18}.", "It is 18", "It is 17"]},
               {"gold": "#### 5", "completions": ["\\boxed{4} or 5?", "5 apples, then 6"]}]  # fmt: skip
    assert sample_counts(samples) == {"completions": 5, "boxed": 2, "last_number_right": 3}


def test_step_phases_are_medians_after_the_first_step():
    metrics = [{"step": 1, "time": {"generate": 9.0, "score": 3.0, "learn": 9.0, "sync": 1.0}},
               {"step": 2, "time": {"generate": 1.0, "score": 0.1, "learn": 0.5, "sync": 0.01}},
               {"step": 3, "time": {"generate": 2.0, "score": 0.1, "learn": 0.7, "sync": 0.01}},
               {"step": 4, "time": {"generate": 1.5, "score": 0.3, "learn": 0.6, "sync": 0.03}}]  # fmt: skip
    phases = step_phases(metrics)
    assert phases["generate"] == 1.5 and phases["learn"] == 0.6 and phases["score"] == 0.1
    assert phases["step"] == pytest.approx(2.43)  # the median whole step (step 4's), not the sum of phase medians


def test_eval_rows_split_what_is_not_correct_into_wrong_and_unboxed():
    results = [{"label": "base", "benchmarks": [{"mean": 14.4, "problems": 500, "seeds": [
        {"statuses": {"correct": 72, "wrong": 90, "parse_failure": 5, "no_boxed": 333},
         "samples": [{"gold": "27", "completions": ["The answer is 27."]},
                     {"gold": "4", "completions": ["\\boxed{5}"]}]}]}]}]  # fmt: skip
    row = eval_rows(results)["base"]
    assert (row["accuracy"], row["correct"], row["wrong"], row["unboxed"], row["problems"]) == (14.4, 72, 95, 333, 500)
    assert row["number_right"] == 1


def test_lens_table_rows_are_the_steered_or_the_asked_layers_top_and_bottom_cells():
    from benchmarks.toy_analysis import lens_table

    entry = {"top_cosine": [{"token": " happy", "score": 0.5}], "bottom_cosine": [{"token": " sad", "score": -0.4}]}
    lens = {"layers": [{"layer": layer, "norm": float(layer), "steered": layer != 2, **entry} for layer in range(4)]}
    assert [r["layer"] for r in lens_table(lens)] == [0, 1, 3]  # the steered ones
    rows = lens_table(lens, layers=(1, 3))
    assert [(r["layer"], r["norm"]) for r in rows] == [(1, 1.0), (3, 3.0)]
    assert "happy" in rows[0]["top"] and "sad" in rows[0]["bottom"] and "sad" not in rows[0]["top"]


def test_canary_gaps_are_every_step_of_metrics(tmp_path):
    from benchmarks.canary_families import gaps

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "logprob_gap": 3e-7}\n{"step": 2, "logprob_gap": 2e-7}\n\n')
    assert gaps(tmp_path) == [3e-7, 2e-7]
