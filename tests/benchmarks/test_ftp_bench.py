"""The FTP benchmark's quick mode (tiny random Llama) runs end to end through the same code path."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("nested", [False, True], ids=["free", "nested"])
def test_ftp_benchmark_quick(tmp_path, nested):
    spec = importlib.util.spec_from_file_location("ftp_bench", REPO / "benchmarks" / "ftp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--quick", "--out", str(tmp_path)] + (["--nested"] if nested else []))
    rows = [l for l in res["table"].splitlines() if l.startswith("| ") and "%" in l]
    assert len(rows) == 5 * len(mod.TARGETS)
    for key, sched in res["refined"].items():
        assert np.mean(sched) == np.float64(float(key)) or abs(np.mean(sched) - float(key)) < 1e-9
    q = res["quality"]
    assert all(np.isfinite(v["ppl"]) and 0 <= v.get("agree", 1) <= 1 for v in q.values())
    assert (tmp_path / "router.safetensors").is_file() and (tmp_path / "results.json").is_file()
    first = mod.dense_first_schedule(4, 0.3)
    assert first[0] == 0.0 and np.mean(first) == pytest.approx(0.3) and np.ptp(first[1:]) == 0
