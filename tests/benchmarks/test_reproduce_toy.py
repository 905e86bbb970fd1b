"""Table 1's arithmetic (gains over Base, the share of full fine-tuning's gain) and its protocol: the learning-rate
sweep runs on its own seed, and every reported seed is trained fresh at the chosen lr."""

import json
import sys
from pathlib import Path

import pytest

from benchmarks import reproduce_toy
from benchmarks.reproduce_toy import _parse_lrs, final_reward, sweep_runs, table


def test_gains_and_shares_are_relative_to_base_and_full_tune():
    rows = {
        "steering": {"lr": "0.05", "parameters": 512, "problems": 500, "after": [0.80, 0.84, 0.82],
                     "reward": [0.5, 0.6, 0.7], "sweep": [{"lr": "0.05"}]},
        "full": {"lr": "3e-4", "parameters": 709248, "problems": 500, "after": [0.85, 0.85, 0.85],
                 "reward": [0.7, 0.7, 0.7], "sweep": None},
    }  # fmt: skip
    text = table(rows, base=[0.15] * 6, base_reward=[0.2] * 6, seeds=[0, 1, 2], sweep_seed=100)
    assert "| Base | 0 | | 15.0 ± 0.0 | | | 0.200 ± 0.000 |" in text
    # steering: mean 82.0, std 2.0, gain 67.0 of full's 70.0 -> 96%
    assert "| Steering | 512 | 0.05 | 82.0 ± 2.0 | +67.0 | 96% | 0.600 ± 0.100 |" in text
    assert "| Full-Tune | 709,248 | 3e-4 | 85.0 ± 0.0 | +70.0 | 100% | 0.700 ± 0.000 |" in text
    assert "seeds 0, 1, 2" in text
    assert "lr of Steering picked by a sweep on seed 100 (not a reported seed" in text
    assert "lr of Full-Tune given (--lr)" in text


def test_the_sweep_picks_by_the_last_steps_training_reward(tmp_path):
    rewards = [0.1] * 5 + [0.9] * 10 + [0.2] * 10  # high in the middle, low at the end
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward_mean": r}) + "\n"
                                                    for i, r in enumerate(rewards, 1)))  # fmt: skip
    assert final_reward(tmp_path) == pytest.approx(0.2)


def test_learning_rates_parse_per_method():
    lrs = _parse_lrs(["full=3e-4,1e-4", "lora=3e-3"])
    assert lrs["full"] == ["3e-4", "1e-4"] and lrs["lora"] == ["3e-3"]
    assert len(lrs["steering"]) > 1  # the default: a sweep
    with pytest.raises(SystemExit, match="METHOD=LR"):
        _parse_lrs(["adam=1"])


def test_the_sweep_runs_on_its_own_seed_only():
    lrs = {"steering": ["0.05", "0.1"], "full": ["1e-4"]}
    runs = sweep_runs(["steering", "full"], lrs, [0, 1, 2], 100)
    assert runs == [("steering", "0.05", 100), ("steering", "0.1", 100)]
    with pytest.raises(SystemExit, match="--sweep-seed 1 is one of the reported --seeds"):
        sweep_runs(["steering"], lrs, [0, 1, 2], 1)


def _fake_train(calls, eval_data):
    """Stands in for trainer.rloo: the sampled reward grows with the lr, so the sweep picks the largest."""

    def train(config, method, lr, seed, directory, extra):
        calls.append((method, lr, seed, Path(directory), extra))
        directory.mkdir(parents=True, exist_ok=True)
        reward = float(lr) + seed / 1000
        (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward_mean": reward}) + "\n"
                                                         for i in range(1, 11)))  # fmt: skip
        (directory / "config.yaml").write_text(f"eval_data: {eval_data}\n")
        return {"eval_accuracy_before": 0.1, "eval_accuracy_after": 0.5 + seed / 100, "trainable_parameters": 4}

    return train


def test_reported_seeds_are_trained_fresh_and_never_reuse_a_sweep_run(tmp_path, monkeypatch, results_dir):
    calls = []
    eval_data = tmp_path / "test.jsonl"
    eval_data.write_text('{"problem": "1+1", "answer": "2"}\n' * 5)
    monkeypatch.setattr(reproduce_toy, "train", _fake_train(calls, eval_data))
    monkeypatch.setattr(reproduce_toy, "plot_curves", lambda *args, **kwargs: None)
    lens = []
    monkeypatch.setattr(reproduce_toy, "record_lens", lambda *args: lens.append(args))
    output = tmp_path / "out"
    reproduce_toy.main(["--methods", "steering,lora", "--seeds", "0,1", "--sweep-seed", "7", "--lr",
                        "steering=0.01,0.1,0.03", "--lr", "lora=3e-3", "--output", str(output)])  # fmt: skip

    sweep = [c for c in calls if c[3].parent == output / "sweep"]
    reported = [c for c in calls if c[3].parent == output]
    assert len(sweep) + len(reported) == len(calls)
    assert [(m, lr, seed) for m, lr, seed, _, _ in sweep] == [("steering", lr, 7) for lr in ("0.01", "0.1", "0.03")]
    assert sorted((m, lr, seed) for m, lr, seed, _, _ in reported) == [
        ("lora", "3e-3", 0), ("lora", "3e-3", 1), ("steering", "0.1", 0), ("steering", "0.1", 1)]  # fmt: skip
    assert {d for *_, d, _ in sweep}.isdisjoint(d for *_, d, _ in reported)
    results = json.loads((output / "results.json").read_text())
    assert results["sweep_seed"] == 7 and results["seeds"] == [0, 1]
    steering = results["methods"]["steering"]
    assert steering["lr"] == "0.1" and steering["after"] == [0.5, 0.51]  # the reported seeds' runs only
    assert all(Path(d).parent == output for d in steering["runs"])
    text = (output / "results.md").read_text()
    assert "lr of Steering picked by a sweep on seed 7 (not a reported seed" in text
    assert "| Steering | 0.01 / **0.1** / 0.03 |" in text
    recorded = json.loads((results_dir / "toy_boxing_seeds0-1_methodssteering-lora.json").read_text())
    assert [(r["method"], r["accuracy"]) for r in recorded["rows"]][:2] == [
        ("Base", "10.0 ± 0.0"),
        ("Steering", "50.5 ± 0.7"),
    ]
    assert recorded["rows"][1]["gain"] == pytest.approx(40.5) and recorded["rows"][1]["share"] is None  # no Full-Tune
    assert lens == [("boxing", output / "steering-lr0.1-seed0", "configs/toy.yaml")]  # the first reported seed's


def test_each_world_has_its_config_and_output_and_lora_ranks_reach_the_trainer(tmp_path):
    args = reproduce_toy._arguments(["--world", "misused"])
    assert args.config == "configs/toy-misused.yaml" and args.output == Path("runs/reproduce-misused")
    assert args.methods == ["steering", "lora", "lora4", "full"]
    boxing = reproduce_toy._arguments([])
    assert boxing.config == "configs/toy.yaml" and boxing.output == Path("runs/reproduce")
    command = reproduce_toy.train_command("c.yaml", "lora4", "3e-3", 2, tmp_path, ["--eval_prompts", "0"])
    assert command[command.index("--trainable") + 1] == "lora" and command[command.index("--lora_rank") + 1] == "4"
    assert command[-2:] == ["--eval_prompts", "0"] and command[command.index("--seed") + 1] == "2"
    from trainer.config import load_config

    root = Path(__file__).resolve().parents[2]
    for world, config in reproduce_toy.WORLDS.items():  # every world's config loads, with the method's overrides
        command = reproduce_toy.train_command(str(root / config), "lora4", "3e-3", 2, tmp_path, [])
        assert command[:3] == [sys.executable, "-m", "trainer.rloo"]
        loaded = load_config(command[3:])
        assert (loaded.trainable, loaded.lora_rank, loaded.seed) == ("lora", 4, 2), world
        assert (root / loaded.model / "model.safetensors").exists() and (root / loaded.eval_data).exists(), world
    with pytest.raises(SystemExit, match="another world"):
        reproduce_toy._arguments(["--world", "absent", "--cross", "absent"])


def test_cross_world_serves_base_and_steering_runs_in_one_engine_and_groups_seeds(tmp_path, monkeypatch, results_dir):
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the world configs name their fixtures relative to the checkout
    other = tmp_path / "reproduce-misused"
    other_runs = [str(other / f"steering-lr0.1-seed{s}") for s in (0, 1)]
    other.mkdir()
    (other / "results.json").write_text(
        json.dumps({"methods": {"steering": {"runs": other_runs}, "lora": {"runs": []}}})
    )
    monkeypatch.setattr(reproduce_toy, "world_output", lambda world: {"misused": other}[world])
    tests = {w: root / f"fixtures/toy-{w}/data/test.jsonl" for w in ("absent", "misused")}
    problems = {w: [json.loads(line) for line in path.read_text().splitlines()] for w, path in tests.items()}
    calls = []

    def evaluate(labels, options, output):
        calls.append((labels, options))
        rows = json.loads((output / "results.json").read_text()) if (output / "results.json").exists() else []
        for label in labels:
            score = {"absent": 10.0 * len(rows), "misused": 1.0 * len(rows)}  # the row's place: which row is which
            rows.append({"label": label, "benchmarks": [
                {"benchmark": w, "mean": m, "seeds": [{"samples": [
                    {"question": p["problem"], "completions": [p["solution"]], "correct": [True]}
                    for p in problems[w]]}]} for w, m in score.items()]})  # fmt: skip
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps(rows))

    monkeypatch.setattr("benchmarks.toy_cross.evaluate", evaluate)
    args = reproduce_toy._arguments(["--world", "absent", "--cross", "misused", "--output", str(tmp_path / "out")])
    here = [tmp_path / "out" / "full-lr1e-4-seed0"]
    reproduce_toy.cross_world(args, {"full": here, "lora": [tmp_path / "out" / "lora-lr3e-3-seed0"]})
    (one_engine, one_engine_options), (full, full_options), (sampled, sampled_options) = calls
    steering = ["steering.misused.steering-lr0.1-seed0", "steering.misused.steering-lr0.1-seed1"]
    assert one_engine == ["base", *steering] and "--include-base" in one_engine_options
    vectors = one_engine_options[one_engine_options.index("--vectors") + 1].split(",")
    assert vectors == [
        f"{label}={run}/steering_vectors.safetensors" for label, run in zip(steering, other_runs, strict=True)
    ]
    assert full == ["full.absent.full-lr1e-4-seed0"]  # lora is not a cross method: no row
    assert full_options[full_options.index("--model") + 1] == str(here[0] / "model")  # a fine-tuned model's dir
    assert sampled == ["base.T1.k8"] and sampled_options[sampled_options.index("--k") + 1] == "8"
    assert all("--save-samples" in options for _, options in calls)
    text = (tmp_path / "out" / "cross.md").read_text()
    # seeds 0 and 1 of steering are rows 1 and 2: absent 10, 20 -> 15.0 ± 7.1; misused 1, 2 -> 1.5 ± 0.7
    assert "| Steering, trained on misused | 15.0 ± 7.1 | 1.5 ± 0.7 |" in text
    assert (
        "| Base | 0.0 ± 0.0 | 0.0 ± 0.0 |" in text
        and "| Full-Tune, trained on absent | 30.0 ± 0.0 | 3.0 ± 0.0 |" in text
    )
    recorded = json.loads((results_dir / "toy_behaviour_misused.json").read_text())["rows"]
    # every completion was the split's own worked solution: all right, every operation written, no wrong step
    assert [(r["trained"], r["kind"]) for r in recorded[:3]] == [("Base", k) for k in ("groups", "sharing", "shopping")]
    assert all(r["accuracy"] == r["operation"] == 100.0 and r["wrong_steps"] == 0.0 for r in recorded)
    assert (results_dir / "toy_sampling.json").exists()


def test_cross_world_refuses_worlds_with_different_base_models(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    args = reproduce_toy._arguments(["--world", "boxing", "--cross", "misused", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="different base models"):
        reproduce_toy.cross_world(args, {})


def test_the_sweep_is_recorded_a_row_per_run_with_the_pick_marked_and_the_table_keeps_numbers_for_the_prose():
    from benchmarks.reproduce_toy import held_out_rows, sweep_rows

    sweep = [{"lr": "0.05", "after": 0.8, "reward": 0.5}, {"lr": "0.1", "after": 0.84, "reward": 0.6}]
    rows = {"steering": {"lr": "0.1", "parameters": 512, "after": [0.8, 0.9], "reward": [0.5, 0.7],
                         "wall_s": [120.0, 130.0, None], "sweep": sweep}}  # fmt: skip
    assert sweep_rows(rows) == [
        {"method": "Steering", "lr": "0.05", "picked": "", "held_out": 80.0, "reward": 0.5},
        {"method": "Steering", "lr": "0.1", "picked": "yes", "held_out": 84.0, "reward": 0.6},
    ]
    base, steering = held_out_rows(rows, base=[0.1, 0.2], base_reward=[0.2, 0.4])
    assert base["accuracy_mean"] == pytest.approx(15.0) and base["reward_mean"] == pytest.approx(0.3)
    assert steering["accuracy_mean"] == pytest.approx(85.0) and steering["wall_median_s"] == 125.0
