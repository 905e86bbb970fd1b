"""Benchmark results as files and the docs tables made from them (benchmarks/results.py, scripts/gen_docs.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import results

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    return tmp_path


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


def test_gen_docs_fills_a_results_block_from_its_file_and_leaves_the_rest(results_dir):
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    gen_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_docs)
    _record()
    page = "before\n<!-- results:demo -->\nold table\n<!-- /results:demo -->\nafter\n"
    filled = gen_docs.with_results(page)
    assert filled.startswith("before\n<!-- results:demo -->\n| case | time (s) | speed-up |")
    assert "old table" not in filled and filled.endswith("<!-- /results:demo -->\nafter\n")
    assert gen_docs.with_results(filled) == filled  # a filled page is what the check expects
