"""The FTP speed benchmark's quick mode runs end to end: table rows, KV memory that shrinks with the sparsity."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ftp_speed_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("ftp_speed", REPO / "benchmarks" / "ftp_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--quick", "--out", str(tmp_path / "speed.json")])
    rows = res["results"]
    assert [r["call"] for r in rows] == [
        "prefill B=1 T=96",
        "prefill B=2 T=64",
        "decode 3 steps B=1 after 24",
        "decode 3 steps B=2 after 24",
    ]
    for r in rows:
        assert all(t > 0 for t in r["time"].values())
        assert r["kv"]["static"] < r["kv"]["dense"] and r["kv"]["token"] < r["kv"]["dense"]
    # prefill: each block stores floor(0.7 * T + 0.5) of T tokens' K/V
    assert rows[0]["kv"]["static"] / rows[0]["kv"]["dense"] == pytest.approx(67 / 96)
    assert rows[1]["kv"]["static"] / rows[1]["kv"]["dense"] == pytest.approx(45 / 64)
    assert (tmp_path / "speed.json").is_file() and res["table"].count("| tiny |") == 4
