"""Small generated-PNG tar shards for the shard pipeline's safety and record tests: member and
shard writers, a quick in-process run (pixel-projection encoder), the CLI command line, and the
output folder's self-consistency check."""

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.encoders import PixelProjectionEncoder
from pipelines.shards import iter_shard, run_filter
from tests.helpers import REPO

PER_SHARD = 30

STEPS = [{"method": "semdedup", "eps": 0.01}, {"method": "random", "keep": 0.5}]


def png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def member(name: str | bytes, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.type = len(data), 1_700_000_000, kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "elsewhere.png"
    return info, data


def write_shard(path: Path, members, *, encoding: str = "utf-8", fmt=tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt, encoding=encoding) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def sample(key: str, seed: int):
    return [member(f"{key}.png", png(seed)), member(f"{key}.txt", f"caption {seed}".encode())]


def run(shards, out, **kw):
    opts = dict(encoder=PixelProjectionEncoder(dim=16), clusters=3, steps=STEPS, shard_max_count=10)
    opts.update(kw)
    return run_filter(shards, out, progress=False, log=lambda *_: None, **opts)


def cli(*args) -> tuple[list[str], dict]:
    """The command line of ``prunekit filter ARGS`` in a subprocess, and its environment."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return [sys.executable, "-m", "pipelines.cli", "filter", *map(str, args)], env


CLI_OPTS = [
    "--encoder",
    "pipelines.encoders:PixelProjectionEncoder",
    "--encoder-kwargs",
    '{"dim": 16}',
    "--clusters",
    "3",
    "--method",
    "random",
    "--shard-max-count",
    "10",
    "--quiet",
]


def consistent(out: Path) -> None:
    """The output folder agrees with itself: every output shard's sha256 is the manifest's and
    the shards hold exactly the kept samples of keep.parquet."""
    import hashlib

    manifest = json.loads((out / "write" / "manifest.json").read_text())
    written = []
    for rec in manifest["shards"]:
        path = out / "write" / rec["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"]
        written += [s.key for s in iter_shard(str(path))]
    keep = pd.read_parquet(out / "select" / "keep.parquet")
    assert sorted(written) == sorted(keep.loc[keep["kept"], "key"])
