"""The dLLM decoding benchmark's --quick code path (untrained smoke model, seconds)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.slow
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


def test_dllm_speed_cost_model():
    import dllm_speed

    costs = {"full": [1.0, 1.0], "prefix": [0.5, 0.25], "dual": [0.1, 0.1]}
    kw = dict(batch=2, gen_length=8, block_length=4)
    none = dllm_speed.combine(costs, 0.5, cache="none", **kw)
    assert none["passes_per_block"] == 2 and none["nfe"] == 4 and none["seconds"] == 4.0
    assert none["tokens_per_s"] == 2 * 8 / 4.0 and none["ms_per_forward"] == 1000.0
    assert dllm_speed.combine(costs, 0.5, cache="prefix", **kw)["seconds"] == 2.75
    assert dllm_speed.combine(costs, 0.5, cache="dual", **kw)["seconds"] == pytest.approx(2.2)
    assert dllm_speed.combine(costs, 0.01, cache="none", **kw)["passes_per_block"] == 1.0  # at least one pass


@pytest.mark.slow
def test_dllm_speed_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))  # no cached weights: smoke testbed
    import dllm_speed

    rows, costs, checks = dllm_speed.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| decoding | cache | batch |" in out and "UNTRAINED" in out
    assert len(rows) == len(dllm_speed.RULES) * len(dllm_speed.CACHES) * 2
    one = [r for r in rows if r["rule"].startswith("one token")]
    assert all(r["nfe"] == 64 for r in one)  # one token per step: gen_length passes
    assert {c["nfe"] for c in checks.values()} == {64}
    for batch in (1, 8):
        assert len(costs[batch]["dual"]) == 64 // 16 and all(t > 0 for t in costs[batch]["full"])
