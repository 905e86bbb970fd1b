"""`python -m trainer.eval`: avg@k and pass@1 on hand-made cases; the CLI on a tiny model with the real
engine, its numbers recomputed directly from the completions it saved."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_utils import ENGINE_ENV

from trainer.eval import avg_at_k, markdown_table, mean_std, save_row

HELPERS = str(Path(__file__).resolve().parents[1] / "helpers")


def test_avg_at_k_and_pass_at_1():
    assert avg_at_k([[True, False, True, False], [True, True, True, True]]) == 75.0
    assert avg_at_k([[True], [False], [False]]) == pytest.approx(100 / 3)  # pass@1
    assert avg_at_k([[False, False]]) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])
    assert mean_std([50.0, 60.0, 70.0]) == (60.0, 10.0)
    assert mean_std([42.0]) == (42.0, 0.0)


def test_the_table_has_setups_as_rows_and_an_average(tmp_path):
    def result(name, mean, std, seeds):
        return {"benchmark": name, "mean": mean, "std": std, "seeds": [{}] * seeds}

    save_row(tmp_path, {"label": "base", "benchmarks": [result("aime24", 10.0, 1.0, 3), result("math500", 50.0, 0, 1)]})
    save_row(tmp_path, {"label": "steered", "benchmarks": [result("aime24", 20.0, 2.0, 3)]})
    rows = save_row(tmp_path, {"label": "base", "benchmarks": [result("aime24", 12.0, 1.0, 3),
                                                                 result("math500", 52.0, 0, 1)]})  # fmt: skip
    assert [r["label"] for r in rows] == ["steered", "base"]  # a label's row is replaced, not duplicated
    assert (
        (tmp_path / "results.md").read_text()
        == markdown_table(rows)
        == (
            "| setup | aime24 | math500 | avg |\n|---|---|---|---|\n"
            "| steered | 20.0 ± 2.0 | - | 20.0 |\n| base | 12.0 ± 1.0 | 52.0 | 32.0 |\n"
        )
    )


def _eval(tmp_path, model, data, output, *extra):
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "trainer.eval", "--model", model, "--benchmarks", f"toy={data}",
               "--reward-fn", "shaped_rewards:first_character", "--max-new-tokens", "8", "--save-samples",
               "--output-dir", str(output), "--engine", "{enforce_eager: true, gpu_memory_utilization: 0.05, "
               "max_model_len: 512}", *extra]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output / "results.json").read_text())[-1]["benchmarks"][0]


@pytest.mark.engine
@pytest.mark.slow
def test_scores_match_a_direct_computation_from_the_completions(tiny_model_dirs, tmp_path):
    from shaped_rewards import first_character

    model = str(tiny_model_dirs["qwen2"])
    questions = [f"What is {a} times {a}?" for a in range(6)]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": "~"}) + "\n" for q in questions))
    seen = _eval(tmp_path, model, data, tmp_path / "seen", "--temperature", "0")
    firsts = [p["completions"][0].strip()[:1] for p in seen["seeds"][0]["samples"]]
    assert all(firsts), "every greedy completion has a first character"
    # plant the right answer for problems 0, 2, 4: greedy decoding repeats itself, so they score, 1, 3, 5 do not
    golds = [first if i % 2 == 0 else "~" for i, first in enumerate(firsts)]
    data.write_text(
        "".join(json.dumps({"problem": q, "answer": g}) + "\n" for q, g in zip(questions, golds, strict=True))
    )
    greedy = _eval(tmp_path, model, data, tmp_path / "greedy", "--temperature", "0", "--seeds", "3")
    assert (greedy["metric"], greedy["k"], len(greedy["seeds"])) == ("pass@1", 1, 1)  # greedy: one sample, one seed
    assert greedy["mean"] == 50.0

    sampled = _eval(tmp_path, model, data, tmp_path / "sampled", "--temperature", "1.0", "--k", "4", "--seeds", "2")
    assert (sampled["metric"], sampled["problems"], len(sampled["seeds"])) == ("avg@4", 6, 2)
    direct = []
    for seed in sampled["seeds"]:
        problems = seed["samples"]
        assert [p["gold"] for p in problems] == golds and all(len(p["completions"]) == 4 for p in problems)
        correct = [[first_character(c, p["gold"]) for c in p["completions"]] for p in problems]
        direct.append(100 * sum(sum(row) / 4 for row in correct) / 6)
        assert seed["score"] == pytest.approx(direct[-1])
        assert seed["pass_at_k"] == pytest.approx(100 * sum(any(row) for row in correct) / 6)
    assert (sampled["mean"], sampled["std"]) == pytest.approx(mean_std(direct))
    assert sampled["seeds"][0]["samples"] != sampled["seeds"][1]["samples"]  # different seeds, different samples


def test_setups_from_vectors_labels_and_the_base(tmp_path):
    from trainer.eval import parse_setups

    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "run2" / "step_200.gguf")
    assert parse_setups(None, None, "org/Model-1B", False) == [("Model-1B", None)]
    assert parse_setups(None, "mine", "m", False) == [("mine", None)]
    assert parse_setups(a, "steered", "m", False) == [("steered", a)]
    assert parse_setups(f"{a}, late={b}", None, "m", True) == [("base", None), ("a", a), ("late", b)]
    with pytest.raises(ValueError, match=r"label\(s\) \['a'\] name more than one setup"):
        parse_setups(f"{a},{tmp_path / 'x' / 'a.gguf'}", None, "m", False)
    with pytest.raises(ValueError, match="malformed"):
        parse_setups(f"a b={a},{b}", None, "m", False)


def test_one_setup_is_served_with_global_vectors_several_as_per_request_sets(tmp_path):
    from trainer.eval import _choices, _engine_settings, parse_args

    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    single = parse_args(["--model", "m", "--vectors", a])
    assert _engine_settings(single)["engine"]["additional_config"] == {"steering_vectors": a}
    assert _choices(single.setups) == [None]
    several = parse_args(["--model", "m", "--vectors", f"{a},{b}", "--include-base"])
    config = _engine_settings(several)["engine"]["additional_config"]
    assert config == {"steering_sets": {"a": a, "b": b}, "max_steering_configs": 2}
    assert _choices(several.setups) == [{"steering": "none"}, {"steering": "a"}, {"steering": "b"}]


@pytest.mark.parametrize("flag", ["--limit", "--k", "--seeds"])
def test_counts_below_one_are_refused(flag, capsys):
    from trainer.eval import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", flag, "0"])
    assert "--seeds, --engines, --k and --limit must be >= 1" in capsys.readouterr().err
