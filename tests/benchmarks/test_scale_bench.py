"""benchmarks/scale.py --quick: the same code as the full run, seconds long."""

import importlib.util

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_scale_quick_out_of_core_equals_in_memory(capsys):
    spec = importlib.util.spec_from_file_location("scale_bench", REPO / "benchmarks" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (result,) = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| 20,000 | 32 |" in out and "GEMM bound" in out
    assert result["identical"] is True
    assert result["dropped"]["duplicate"] >= 0.03 * 20_000  # 5% planted near-copies
    assert 0 < result["kept"] < 20_000 and result["peak_rss_gb"] > 0
    assert result["schemes"]["old_s"] > 0 and result["schemes"]["new_s"] > 0 and result["schemes"]["clusters"] == 20
    assert result["stages"]["semdedup"]["gflop"] > 0
