"""The python examples of docs/localleap.md run (in order, one namespace) and finish in seconds."""

import os
import re
import time
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[3] / "docs" / "localleap.md"
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def doc_blocks() -> list[str]:
    """The ``python`` blocks of the page, without those marked ``no-run``."""
    return [code for info, code in FENCE.findall(DOC.read_text()) if "no-run" not in info]


@pytest.mark.slow
def test_doc_examples_run(tmp_path, monkeypatch, capsys):
    blocks = doc_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the examples write a folder; keep it out of the checkout
    os.symlink(DOC.parents[1] / "benchmarks", tmp_path / "benchmarks")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(DOC.parents[1]))
    torch.set_num_threads(1)
    namespace: dict = {}
    t0 = time.process_time()
    for code in blocks:  # a failing assert inside a block fails the test
        exec(compile(code, str(DOC), "exec"), namespace)
    assert time.process_time() - t0 < 120  # seconds, not the 3,000-step training
    assert (tmp_path / "tiny-llada" / "config.json").exists()
    assert namespace["slow"].stats.forward_passes == 16
    assert "tokens_per_forward" in capsys.readouterr().out
