"""The GPU measurement scripts, checked on the CPU: embed_throughput.py's --quick table and
benchmarks/gpu_all.sh's command list (dry run) and failure handling."""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

EMBED_COLUMNS = [
    "model",
    "decode workers",
    "torch threads",
    "(a) embed stage",
    "(b) encoder alone",
    "(c) decode alone",
    "bound 1/(1/b+1/c)",
    "(a)/bound",
    "old serial",
]
BENCHMARKS = ["embed_throughput.py", "ftp_speed.py", "fopru_speed.py", "dllm_speed.py", "dataprune_scale.py"]


def run_gpu_all(tmp_path, **env):
    full = {**os.environ, "OUT": str(tmp_path / "gpu_out"), **env}
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_all.sh")], env=full, capture_output=True, text=True, timeout=60
    )


def table_rows(out: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


@pytest.mark.slow
def test_embed_throughput_quick_prints_the_cpu_table_with_gpu_decode_rows():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "benchmarks/embed_throughput.py", "--quick", "--device", "cpu", "--gpu-decode"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "device cpu, precision fp32" in out and "bound = 1/(1/b+1/c)" in out
    header, rows = table_rows(out, "| model | decode workers")
    for column in EMBED_COLUMNS:
        assert column in header, (column, header)
    assert [r[1] for r in rows] == ["1", "gpu"]  # CPU decode workers, then the torchvision-decode row
    for row in rows:
        assert row[0] == "small-vit"
        a, b, c, bound = (float(row[header.index(k)]) for k in EMBED_COLUMNS[3:7])
        assert min(a, b, c) > 0
        assert abs(bound - 1 / (1 / b + 1 / c)) <= 1.0  # the shared-cores bound on the CPU (rounded print)


@pytest.mark.slow
def test_embed_throughput_rejects_unknown_precision():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "benchmarks/embed_throughput.py", "--quick", "--precision", "int8"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--precision" in proc.stderr


def test_gpu_all_dry_run_lists_every_benchmark_on_cuda_with_real_flags(tmp_path):
    proc = run_gpu_all(tmp_path, GPU_ALL_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for bench in BENCHMARKS:
        hits = [line for line in lines if f"benchmarks/{bench}" in line]
        assert hits, f"{bench} missing from gpu_all.sh"
        source = (REPO / "benchmarks" / bench).read_text()
        for line in hits:
            assert "--device cuda" in line and "| tee " in line
            for flag in re.findall(r"(--[a-z][a-z0-9-]*)", line.split("| tee")[0]):
                assert f'"{flag}"' in source, f"{bench} has no {flag} flag"
    embed = [line for line in lines if "embed_throughput.py" in line]
    assert len(embed) == 2 and sum("--gpu-decode" in line for line in embed) == 1
    assert all("--precision bf16" in line and "ViT-B-32" in line for line in embed)
    assert not (tmp_path / "gpu_out").exists()  # a dry run writes nothing


def test_gpu_all_goes_on_after_a_failure_and_reports_it(tmp_path):
    proc = run_gpu_all(tmp_path, PYTHON="false", GPU_ALL_ONLY="ftp_speed dllm_speed")
    assert proc.returncode == 1
    summary = (tmp_path / "gpu_out" / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["ftp_speed", "dllm_speed"]
    assert all("exit 1" in line for line in summary)
    assert (tmp_path / "gpu_out" / "ftp_speed.txt").exists() and (tmp_path / "gpu_out" / "dllm_speed.txt").exists()
