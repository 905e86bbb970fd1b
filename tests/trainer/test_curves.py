"""Training curves from metrics.jsonl and summary.json: the numbers plotted, and the PNG."""

import json

import numpy as np
import pytest

from trainer.curves import main, moving_average, plot_curves, run_curves


def _run(path, rewards, evals=None, before=None, after=None):
    path.mkdir()
    lines = []
    for step, reward in enumerate(rewards, start=1):
        record = {"step": step, "reward_mean": reward}
        if evals and step in evals:
            record["eval_accuracy"] = evals[step]
        lines.append(json.dumps(record) + "\n")
    (path / "metrics.jsonl").write_text("".join(lines))
    summary = {k: v for k, v in (("eval_accuracy_before", before), ("eval_accuracy_after", after)) if v is not None}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_moving_average_is_a_trailing_mean():
    values = np.array([1.0, 2.0, 6.0, 3.0, 8.0])
    expected = [np.mean(values[max(0, i - 2) : i + 1]) for i in range(len(values))]
    assert moving_average(values, 3) == pytest.approx(expected)
    assert moving_average(values, 1) == pytest.approx(values)


def test_run_curves_puts_before_and_after_at_the_ends(tmp_path):
    run = _run(tmp_path / "a", [0.1, 0.2, 0.3, 0.4], evals={2: 0.5}, before=0.2, after=0.7)
    curves = run_curves(run)
    assert curves["steps"] == [1, 2, 3, 4] and curves["reward"] == [0.1, 0.2, 0.3, 0.4]
    assert curves["eval_steps"] == [0, 2, 4] and curves["eval_accuracy"] == [0.2, 0.5, 0.7]


def test_a_run_without_eval_has_no_eval_points(tmp_path):
    curves = run_curves(_run(tmp_path / "a", [0.1, 0.2]))
    assert curves["eval_steps"] == [] and curves["eval_accuracy"] == []


def test_groups_plot_to_png_and_the_cli_reports_missing_runs(tmp_path, capsys):
    a = _run(tmp_path / "a", [0.1, 0.2, 0.3], before=0.1, after=0.4)
    b = _run(tmp_path / "b", [0.2, 0.3, 0.5], before=0.1, after=0.6)
    c = _run(tmp_path / "c", [0.1, 0.1], before=0.1, after=0.1)
    path = plot_curves({"steering": [a, b], "full": [c]}, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([f"steering={a},{b}", str(c), "-o", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").is_file()
    assert main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no metrics" in capsys.readouterr().err


def test_sweep_run_folders_holding_equals_and_commas_parse_as_runs(tmp_path):
    from trainer.curves import _parse_groups

    s0 = _run(tmp_path / "learning_rate=0.1,seed=0", [0.1])
    s1 = _run(tmp_path / "learning_rate=0.1,seed=1", [0.2])
    assert _parse_groups([str(s0)]) == {"learning_rate=0.1,seed=0": [str(s0)]}
    assert _parse_groups([f"lr 0.1={s0},{s1}"]) == {"lr 0.1": [str(s0), str(s1)]}
    assert _parse_groups([f"x={tmp_path / 'a'},{tmp_path / 'b'}"]) == {"x": [str(tmp_path / "a"), str(tmp_path / "b")]}
    assert main([str(s0), f"lr 0.1={s0},{s1}", "-o", str(tmp_path / "sweep.png")]) == 0
