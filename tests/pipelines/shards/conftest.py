"""Fixtures of the shard-pipeline tests: the tiny open_clip ViT config file and three small
generated-PNG shards."""

import json

import pytest

from tests.helpers.safe_shards import PER_SHARD, sample, write_shard
from tests.helpers.shards import TINY_VIT


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """Path of the tiny random-weight open_clip ViT config (no weights, no download)."""
    path = tmp_path_factory.mktemp("model") / "prunekit-test-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Three shards of PER_SHARD generated PNG samples (key + png + txt each)."""
    root = tmp_path_factory.mktemp("safe_shards")
    paths = []
    for s in range(3):
        path = root / f"{s:05d}.tar"
        write_shard(path, [m for i in range(PER_SHARD) for m in sample(f"s{s}_{i:04d}", s * 1000 + i)])
        paths.append(str(path))
    return paths
