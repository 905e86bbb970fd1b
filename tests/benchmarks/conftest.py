"""Every benchmark test writes its result files under its own tmp_path: a test run never overwrites the measured
files in benchmarks/results/ that the docs' tables are generated from."""

import pytest

from benchmarks import results


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    return tmp_path / "results"
