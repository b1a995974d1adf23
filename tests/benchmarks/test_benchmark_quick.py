"""The scale benchmark's --quick path (same code as the full run, seconds-long)."""

import importlib.util

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_dataprune_scale_quick_runs_and_matches_naive_reference(capsys):
    spec = importlib.util.spec_from_file_location("dataprune_scale", REPO / "benchmarks" / "dataprune_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (result,) = bench.main(["--quick"])  # asserts naive reference == ours internally
    out = capsys.readouterr().out
    assert "| 20,000 |" in out and "other backend" in out
    assert 0 < result["kept"] < 20_000
    assert result["dropped"]["duplicate"] >= 0.03 * 20_000  # 5% planted near-duplicates
    assert set(result["timings"]) >= {"kmeans", "assign", "semdedup", "dbp"}
