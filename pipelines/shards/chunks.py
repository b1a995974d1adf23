"""The embed artifact on disk: one chunk (rows + keys) per resume unit, merged at the end.

Files (``OUT/embed/``): ``chunks/{i}.img.npy`` (+ ``.txt.npy``) and ``chunks/{i}.keys.parquet``
per unit, ``keys.parquet`` (every sample, input order), ``embeddings.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from prunecore.io import atomic_write_json
from prunecore.rows import ChunkedRows

from .decode import TOO_LARGE
from .stage import MISSING_IMAGE, STATUS_OK, UNDECODABLE, PipelineError, read_parquet, save_npy, save_parquet
from .tario import NAME_COUNTERS, NO_IMAGE, NON_UTF8_NAME, ShardScan


@dataclass
class EmbedArtifact:
    """Embeddings (row sources over memmaps) + the sample table in input order.

    keys: one row per sample read: ``key, shard, shard_idx, index, nbytes, status, row``
    (``row`` = embedding row, -1 when the sample has none; ``status`` is ``"ok"`` or the
    reason it has no embedding). images/texts: (n_ok, d) row sources (texts may be None).
    """

    dir: Path
    keys: pd.DataFrame
    images: np.ndarray | ChunkedRows
    texts: np.ndarray | ChunkedRows | None
    shards: list[str]
    fingerprint: str

    @property
    def n_rows(self) -> int:
        return int(self.images.shape[0])


def open_rows(paths: list[Path]):
    arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths]
    arrays = [a for a in arrays if a.shape[0] > 0]
    if not arrays:
        raise PipelineError("no sample produced an embedding (all missing or undecodable)")
    return arrays[0] if len(arrays) == 1 else ChunkedRows(arrays)


def load_embed_artifact(stage_dir: Path, fingerprint: str, keys: pd.DataFrame | None = None) -> EmbedArtifact:
    """The embed stage's artifact; ``keys``: the sample table when the caller holds it already."""
    index = json.loads((stage_dir / "embeddings.json").read_text())
    keys = read_parquet(stage_dir / "keys.parquet") if keys is None else keys

    def resolve(p):
        return Path(p) if os.path.isabs(p) else stage_dir / p

    images = open_rows([resolve(p) for p in index["images"]])
    texts = open_rows([resolve(p) for p in index["texts"]]) if index.get("texts") else None
    n_ok = int((keys["row"] >= 0).sum())
    if images.shape[0] != n_ok or (texts is not None and texts.shape[0] != n_ok):
        raise PipelineError(f"{stage_dir}: {images.shape[0]} embedding rows but {n_ok} keys with an embedding")
    return EmbedArtifact(stage_dir, keys, images, texts, index.get("shards", []), fingerprint)


def chunk_paths(stage_dir: Path, i: int) -> dict[str, Path]:
    base = stage_dir / "chunks" / f"{i:05d}"
    return {
        "img": base.with_suffix(".img.npy"),
        "txt": base.with_suffix(".txt.npy"),
        "keys": base.with_suffix(".keys.parquet"),
    }


def save_chunk(
    stage_dir: Path, i: int, table: pd.DataFrame, images, texts, scan: ShardScan, *, dim: int | None, dtype, text: bool
) -> None:
    """Write one shard's chunk; the keys parquet goes last and marks the chunk complete."""
    paths = chunk_paths(stage_dir, i)
    paths["img"].parent.mkdir(parents=True, exist_ok=True)
    width = images.shape[1] if images is not None else (dim or 0)
    save_npy(paths["img"], (images if images is not None else np.zeros((0, width), np.float32)).astype(dtype))
    if text:
        save_npy(paths["txt"], (texts if texts is not None else np.zeros((0, width), np.float32)).astype(dtype))
    save_parquet(paths["keys"], table, {"scan": scan.counters()})


def finalize_embed(stage_dir: Path, shards: list[str], *, text: bool) -> dict:
    """Merge per-shard chunk tables into keys.parquet, check keys, write embeddings.json."""
    tables, errors, totals, examples = [], [], dict.fromkeys(NAME_COUNTERS, 0), []
    images, texts = [], []
    for i, shard in enumerate(shards):
        paths = chunk_paths(stage_dir, i)
        t = pq.read_table(paths["keys"])
        scan = json.loads((t.schema.metadata or {}).get(b"scan", b"{}"))
        if scan.get("error"):
            errors.append(scan["error"])
        for name in NAME_COUNTERS:
            totals[name] += int(scan.get(name, 0))
        examples += scan.get("examples", [])
        df = t.to_pandas()
        df.insert(1, "shard", shard)
        df.insert(2, "shard_idx", np.int64(i))
        tables.append(df)
        images.append(str(paths["img"].relative_to(stage_dir)))
        if text:
            texts.append(str(paths["txt"].relative_to(stage_dir)))
    keys = (
        pd.concat(tables, ignore_index=True)
        if tables
        else pd.DataFrame(columns=["key", "shard", "shard_idx", "index", "nbytes", "status"])
    )
    check_duplicate_keys(keys)
    ok = (keys["status"] == STATUS_OK).to_numpy()
    row = np.full(len(keys), -1, dtype=np.int64)
    row[ok] = np.arange(int(ok.sum()))
    keys["row"] = row
    save_parquet(stage_dir / "keys.parquet", keys)
    atomic_write_json(stage_dir / "embeddings.json", {"images": images, "texts": texts, "shards": shards})
    counts = keys["status"].value_counts().to_dict()
    return {
        "samples": int(len(keys)),
        "embedded": int(ok.sum()),
        "missing_image": int(counts.get(MISSING_IMAGE, 0)),
        "undecodable": int(counts.get(UNDECODABLE, 0)),
        "no_image": int(counts.get(NO_IMAGE, 0)),
        "non_utf8_name": int(counts.get(NON_UTF8_NAME, 0)),
        "too_large": int(counts.get(TOO_LARGE, 0)),
        "corrupt_shards": errors,
        **totals,
        "name_examples": examples[:5],
        "shards": len(shards),
    }


def check_duplicate_keys(keys: pd.DataFrame) -> None:
    dup = keys["key"].duplicated(keep=False)
    if dup.any():
        first = keys.loc[dup, ["key", "shard"]].head(6)
        where = "; ".join(f"{k} in {s}" for k, s in first.itertuples(index=False))
        raise PipelineError(
            f"duplicate keys: {int(keys.loc[dup, 'key'].nunique())} key(s) occur "
            f"more than once ({where}); keys must be unique across shards"
        )


@dataclass
class EmbeddedUnit:
    """One resume unit embedded, ready for :func:`save_chunk`.

    i: the unit's index; table: its samples (``key, index, nbytes, status``) in input order;
    images / texts: (m, d) float32 rows of the ``ok`` samples, or None when none decoded;
    scan: what reading it found (name counters, a corrupt-tar error); width: the row width
    to save when ``images`` is None (None: 0).
    """

    i: int
    table: pd.DataFrame
    images: np.ndarray | None
    texts: np.ndarray | None
    scan: ShardScan
    width: int | None = None
