"""Ray Data backend: the same keep-list (and the same output files) as the local backend,
on a local Ray with 2 CPUs. Real images (CIFAR-10 when present), tiny random open_clip ViT."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="ray is in the dev extra: pip install 'ray[data]'")

from pipelines.shards import run_filter  # noqa: E402
from tests.helpers import REPO  # noqa: E402
from tests.helpers.shards import TINY_VIT, write_shard  # noqa: E402
from tests.helpers.shards import rename as _rename  # noqa: E402
from tests.helpers.shards import source_samples as _source_samples  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


def _files(out):
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("_stage.json", ".prunekit.json", ".prunekit.lock")
    }


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [16, 7])
def test_ray_backend_matches_local(local_ray, batch_size, tmp_path):
    """Ray workers run with OMP_NUM_THREADS=1; the run's thread count (recorded) is what they
    embed and score with, so the rows and scores are the local ones bit for bit."""
    samples = _source_samples(120)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    copies = [_rename(samples[i], f"copy_{i}") for i in range(0, 12, 3)]  # exact duplicates
    write_shard(shard_dir / "00000.tar", samples[:60])
    write_shard(shard_dir / "00001.tar", samples[60:120] + copies)
    model = tmp_path / "prunekit-ray-vit.json"
    model.write_text(json.dumps(TINY_VIT))
    shards = str(shard_dir / "{00000..00001}.tar")
    steps = [{"method": "semdedup", "eps": 0.003}, {"method": "dbp", "keep": 0.5, "temperature": 0.5}]
    kw = dict(
        model=str(model),
        clusters=4,
        steps=steps,
        batch_size=batch_size,
        shard_max_count=20,
        progress=False,
        log=lambda *_: None,
    )
    local = run_filter(shards, tmp_path / "local", threads=2, **kw)
    remote = run_filter(shards, tmp_path / "ray", backend="ray", threads=2, **kw)
    pd.testing.assert_frame_equal(remote.keep, local.keep)
    assert (local.keep["reason"] == "duplicate").sum() >= len(copies)  # SemDeDup groupby ran
    assert 0 < local.keep["kept"].sum() < len(local.keep)
    assert remote.manifest["shards"] == local.manifest["shards"]
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    # the Ray run is resumable like the local one: a rerun skips everything
    again = run_filter(shards, tmp_path / "ray", backend="ray", threads=2, **kw)
    assert all(st.skipped for st in again.stages.values())
    np.testing.assert_array_equal(again.keep["kept"], local.keep["kept"])
