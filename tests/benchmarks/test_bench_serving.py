"""The serving benchmark's workload: every round sends fresh prompts of the same shape, so vLLM's prefix cache
cannot turn later rounds into decode-only work; and its record: a row per engine, ratios to the first engine from
the same rounds, and a file of its own for each setting (--eager, another shape)."""

import json

from benchmarks import results
from benchmarks.bench_serving import arguments, record_table, round_prompts, write_config


def test_every_round_sends_fresh_prompts_of_the_same_lengths():
    rounds = [round_prompts(r, batch=16, prompt_len=128) for r in range(6)]
    assert all(len(prompts) == 16 and all(len(p) == 128 for p in prompts) for prompts in rounds)
    # no prompt recurs, within a round or across rounds, nor does any first cache block (16 tokens)
    assert len({tuple(p) for prompts in rounds for p in prompts}) == 6 * 16
    assert len({tuple(p[:16]) for prompts in rounds for p in prompts}) == 6 * 16
    assert round_prompts(3, 16, 128) == rounds[3]  # every engine gets the same prompts within a round


def _config(argv, directory):
    """The parsed options and the model config that main() would have."""
    args, parser = arguments(argv)
    return args, parser, json.loads((write_config(directory, args.shape, args.layers) / "config.json").read_text())


def test_a_run_records_each_engines_median_and_its_ratios_to_the_first(tmp_path):
    args, parser, config = _config(["--rounds", "3"], tmp_path)
    rates = {"stock": [100.0, 110.0, 90.0], "steered": [105.0, 99.0, 99.0], "naive": [90.0, 90.0, 90.0],
             "stock-2": [100.0, 100.0, 100.0]}  # fmt: skip
    name, title = record_table(rates, config, args, parser)
    recorded = results.load(name)
    assert name == f"serving_{results.device()}" and recorded["title"] == title
    assert [c[1] for c in recorded["columns"]] == ["engine", "output tokens/s (median)", "vs stock (ratio of medians)",
                                                   "vs stock (median of round ratios)"]  # fmt: skip
    assert [r["engine"] for r in recorded["rows"]] == list(rates)  # a row per engine, the baseline first
    lines = results.markdown(recorded).splitlines()
    assert lines[2] == "| stock | 100.0 | 1.000 | 1.000 |"
    assert lines[3] == "| steered | 99.0 | 0.990 | 1.050 |"  # median 99 / 100; per round 1.05, 0.9, 1.1 -> 1.05
    assert recorded["rows"][1]["rounds"] == rates["steered"]
    assert "qwen2.5-0.5b (24 layers, d=896)" in title and "torch.compile" in title and "3 rounds" in title


def test_an_eager_run_or_another_shape_does_not_overwrite_the_default_table(tmp_path):
    rates = {"stock": [1.0], "steered": [1.0]}
    for argv, suffix in (([], ""), (["--rounds", "2"], ""), (["--eager"], "_eager"),
                         (["--shape", "qwen2.5-1.5b", "--layers", "4"], "_shapeqwen2.5-1.5b_layers4")):  # fmt: skip
        args, parser, config = _config(argv, tmp_path)
        name, title = record_table(rates, config, args, parser)
        assert name == f"serving_{results.device()}{suffix}"
    assert "qwen2.5-1.5b (4 layers, d=1536)" in title
