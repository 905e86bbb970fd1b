"""The per-request benchmark's workload and record: request i of a batch takes set i mod k, and a run records its
two tables (throughput, a row per engine and mix; first token, known against new configuration), ratios from the
same run, under names of their own for other settings."""

import json

from benchmarks import bench_per_request as bench
from benchmarks import results
from benchmarks.bench_serving import write_config


def test_a_batch_takes_k_distinct_sets_in_turn_and_the_other_engines_none():
    assert bench.choices_for("per-request", 4, 2) == [{"steering": f"s{i % 2}"} for i in range(4)]
    assert bench.choices_for("global", 3, 8) == [None] * 3 and bench.choices_for("stock", 2, 1) == [None] * 2


def _run(argv, directory):
    """What main() has measured for ``argv``: made-up rates of every engine and mix, first-token seconds."""
    args, parser = bench.arguments(argv)
    config = json.loads((write_config(directory, args.shape, args.layers) / "config.json").read_text())
    columns = [(kind, 1) for kind in bench.KINDS if kind != "per-request"] + [("per-request", m) for m in bench.MIXES]
    rates = {column: [100.0 + i + r for r in range(args.rounds)] for i, column in enumerate(columns)}
    ttft = {"known": [0.1] * args.ttft_pairs, "new": [0.11] * args.ttft_pairs}
    shape = (config["num_hidden_layers"], config["hidden_size"])
    return bench.record_tables(rates, ttft, shape, args, parser), rates


def test_a_run_records_a_throughput_row_per_engine_and_mix_and_the_first_token_both_ways(tmp_path):
    ((throughput, title), (first_token, _)), rates = _run(["--rounds", "3", "--ttft-pairs", "2"], tmp_path)
    device = results.device()
    assert (throughput, first_token) == (f"per_request_{device}", f"per_request_{device}_first_token")
    recorded = results.load(throughput)
    assert [tuple(c) for c in recorded["columns"]] == bench.THROUGHPUT_COLUMNS
    assert len(recorded["rows"]) == len(rates) == 6  # stock, global, global-2, per-request x 3 mixes
    lines = results.markdown(recorded).splitlines()
    assert lines[2] == "| stock | 0 (stock) | 101.0 | 0.990 | 0.990 |"  # 101 / 102, every round 1 below global
    assert lines[3] == "| global | 1 | 102.0 | 1.000 | 1.000 |"
    assert [line.split("|")[1:3] for line in lines[5:8]] == [[" per-request ", f" {m} "] for m in bench.MIXES]
    assert recorded["rows"][0]["rounds"] == [100.0, 101.0, 102.0] and "3 rounds" in title
    recorded = results.load(first_token)
    assert [tuple(c) for c in recorded["columns"]] == bench.FIRST_TOKEN_COLUMNS and len(recorded["rows"]) == 2
    lines = results.markdown(recorded).splitlines()
    assert lines[2:4] == ["| already in a row | 100.0 | 1.00x |", "| new to the engine | 110.0 | 1.10x |"]
    assert "medians of 2 interleaved pairs" in recorded["title"]


def test_a_run_at_other_settings_does_not_overwrite_the_default_tables(tmp_path):
    device = results.device()
    for argv, suffix in (([], ""), (["--rounds", "2"], ""), (["--eager"], "_eager"),
                         (["--shape", "qwen2.5-1.5b", "--layers", "2"], "_shapeqwen2.5-1.5b_layers2")):  # fmt: skip
        (throughput, _), (first_token, _) = _run(argv, tmp_path / str(len(suffix)))[0]
        assert throughput == f"per_request_{device}{suffix}"
        assert first_token == f"per_request_{device}_first_token{suffix}"
