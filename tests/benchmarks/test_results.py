"""Benchmark results as files and the docs tables made from them (benchmarks/results.py, scripts/gen_docs.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import results

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen_docs():
    """scripts/gen_docs.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(columns=None, rows=None):
    columns = columns or [("case", "case", ""), ("time", "time (s)", ".2f"), ("ratio", "speed-up", ".2f}x")]
    rows = rows or [{"case": "big", "time": 1.23456, "ratio": 2.0}, {"case": "small", "time": 0.5, "ratio": 1.049}]
    return results.record("demo", "a demo", columns, rows, notes="Medians of 3.")


def test_a_result_file_records_the_command_commit_machine_versions_and_every_row(results_dir):
    path = _record()
    saved = json.loads(path.read_text())
    assert path == results_dir / "demo.json"
    assert saved["command"].startswith("python -m benchmarks.") and saved["commit"]
    assert saved["machine"]["cores"] >= 1 and isinstance(saved["machine"]["isa_flags"], list)
    assert "torch" in saved["versions"] and saved["rows"][0] == {"case": "big", "time": 1.23456, "ratio": 2.0}


def test_the_table_formats_each_column_as_its_spec_says(results_dir):
    table = results.markdown(json.loads(_record().read_text()))
    lines = table.splitlines()
    assert lines[:4] == ["| case | time (s) | speed-up |", "|---|---|---|", "| big | 1.23 | 2.00x |",
                         "| small | 0.50 | 1.05x |"]  # fmt: skip
    assert "Medians of 3." in lines[-1] and "python -m benchmarks." in lines[-1]


def test_gen_docs_fills_a_results_block_from_its_file_and_leaves_the_rest(results_dir, gen_docs):
    _record()
    page = "before\n<!-- results:demo -->\nold table\n<!-- /results:demo -->\nafter\n"
    filled = gen_docs.with_results(page)
    assert filled.startswith("before\n<!-- results:demo -->\n| case | time (s) | speed-up |")
    assert "old table" not in filled and filled.endswith("<!-- /results:demo -->\nafter\n")
    assert gen_docs.with_results(filled) == filled  # a filled page is what the check expects


def test_gen_docs_fills_a_single_value_from_a_row_of_its_file(results_dir, gen_docs):
    _record()
    line = "**<!-- value:demo:1:ratio:.2f}x -->9.99x<!-- /value -->**, <!-- value:demo:0:case: -->?<!-- /value -->"
    assert gen_docs.with_results(line) == line.replace("9.99x", "1.05x").replace("-->?<", "-->big<")
    with pytest.raises(KeyError, match="no row 2 with 'ratio'"):
        gen_docs.with_results("<!-- value:demo:2:ratio:.2f -->1<!-- /value -->")


def test_a_column_may_take_each_rows_own_spec_and_none_reads_as_a_dash(results_dir):
    columns = [("what", "", ""), ("value", "value", "@format"), ("ratio", "ratio", ".1f}x")]
    rows = [{"what": "count", "format": ",", "value": 1234567, "ratio": None},
            {"what": "seconds", "format": ".4f", "value": 0.5, "ratio": 2.0},
            {"what": "text", "value": "fp32"}]  # fmt: skip
    lines = results.markdown(json.loads(_record(columns, rows).read_text())).splitlines()
    assert lines[2:5] == ["| count | 1,234,567 | - |", "| seconds | 0.5000 | 2.0x |", "| text | fp32 |  |"]


def test_a_run_at_other_settings_than_the_defaults_is_named_after_them():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--kinds", default="stock,steered")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--rounds", type=int, default=8)
    options = ("shape", "tokens", "kinds", "eager")
    assert results.variant("serving_cpu", parser, parser.parse_args(["--rounds", "3"]), options) == "serving_cpu"
    args = parser.parse_args(["--eager", "--shape", "qwen2.5-7b", "--tokens", "16", "--kinds", "stock,naive"])
    assert results.variant("serving_cpu", parser, args, options) == (
        "serving_cpu_shapeqwen2.5-7b_tokens16_kindsstock-naive_eager"
    )


def test_no_benchmark_test_can_write_into_the_real_results_directory(results_dir):
    # tests/benchmarks/conftest.py points every test of this folder at its own tmp_path
    assert results.RESULTS_DIR == results_dir != ROOT / "benchmarks" / "results"


def test_a_trial_run_in_another_process_can_send_its_files_elsewhere(tmp_path):
    import os
    import subprocess
    import sys

    code = "from benchmarks import results; print(results.RESULTS_DIR)"
    env = {**os.environ, "STEERING_BENCH_RESULTS_DIR": str(tmp_path / "trial")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "trial")


def test_the_commit_is_the_repositorys_wherever_the_files_go(results_dir):
    assert results._commit() not in ("", "unknown")  # results_dir is outside the checkout
