"""`make demo` (the README's main job) runs offline end to end and finds the planted duplicates."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_demo_runs_offline_and_catches_every_planted_duplicate(tmp_path):
    out = tmp_path / "demo_out"
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--out", str(out), "--quiet", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "planted near-duplicate pairs caught by SemDeDup: 250/250; other rows marked duplicate: 0" in run.stdout
    assert (out / "filter" / "select" / "keep.parquet").is_file()
    assert (out / "filter" / "report" / "index.html").is_file()
    assert sorted((out / "filter" / "write").glob("*.tar"))
    rerun = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--out", str(out), "--quiet", "--no-report", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]  # a rerun on the same folder skips, never refuses
