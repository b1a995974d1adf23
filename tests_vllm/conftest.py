"""Fixtures of the vLLM plugin tests (run by ``make test-vllm`` in the vLLM environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL folder (written once per session)."""
    from tiny_qwen import write_tiny_qwen2_5_vl

    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    write_tiny_qwen2_5_vl(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL folder (written once per session)."""
    from tiny_qwen import write_tiny_qwen3_vl

    folder = tmp_path_factory.mktemp("qwen3_vl")
    write_tiny_qwen3_vl(folder)
    return folder


def run_engine(folder: Path, options: dict, *, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run tests_vllm/engine_run.py in a fresh process (vLLM starts its engine and worker processes)."""
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(HERE / "engine_run.py"), str(folder), json.dumps(options)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def engine_result(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="session")
def engines(tiny_qwen) -> dict:
    """One engine run per setting, shared by the tests: plugin off, keep 1.0, keep 0.25 (+ kept indices)."""
    runs = {
        "off": run_engine(tiny_qwen, {}),
        "keep1": run_engine(tiny_qwen, {"prunekit": {"keep": 1.0}}),
        "keep25": run_engine(tiny_qwen, {"prunekit": {"keep": 0.25}, "kept": True}),
    }
    return {name: (proc, engine_result(proc)) for name, proc in runs.items()}


@pytest.fixture(scope="session")
def engines_qwen3(tiny_qwen3) -> dict:
    """The same three settings for the tiny Qwen3-VL."""
    family = {"family": "qwen3_vl"}
    runs = {
        "off": run_engine(tiny_qwen3, family),
        "keep1": run_engine(tiny_qwen3, {**family, "prunekit": {"keep": 1.0}}),
        "keep25": run_engine(tiny_qwen3, {**family, "prunekit": {"keep": 0.25}, "kept": True}),
    }
    return {name: (proc, engine_result(proc)) for name, proc in runs.items()}
