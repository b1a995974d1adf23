"""The dLLM decoding benchmark's --quick code path (untrained smoke model, seconds)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_dllm_decoding_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))  # no cached weights: smoke model
    import dllm_decoding

    results = dllm_decoding.main(["--quick", "--threads", "1", "--task", "parity"])
    rows = results["parity"]
    out = capsys.readouterr().out
    assert "| decoding | exact match |" in out and "UNTRAINED" in out
    names = [r["method"] for r in rows]
    assert names[0].startswith("LLaDA, 1 token/step")
    assert len(rows) == 7
    g = dllm_decoding.tb.GEN_LENGTH
    assert rows[0]["nfe"] == pytest.approx(g)  # one token per step
    assert rows[1]["nfe"] == pytest.approx(g // 2)
    assert rows[2]["nfe"] == pytest.approx(g // 4)
    blocks = g // 8
    for r in rows:
        assert blocks <= r["nfe"] <= g
        assert 0.0 <= r["acc"] <= 1.0
