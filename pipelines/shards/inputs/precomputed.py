"""Precomputed embeddings (``.npy`` + metadata parquet) as the embed stage's input.

Nothing is embedded: the embed stage's artifact (``keys.parquet`` + ``embeddings.json``)
references the embedding files in place (not copied).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from pipelines.shards.chunks import EmbedArtifact, load_embed_artifact
from pipelines.shards.stage import (
    NO_EMBEDDING,
    STATUS_OK,
    PipelineError,
    parquet_columns,
    read_parquet,
    release_scratch,
    save_parquet,
    string_dtype,
)
from pipelines.shards.tario import ShardScan, check_unique_keys, file_fingerprint, iter_shard_headers
from prunecore.io import atomic_write_json
from prunecore.rows import open_embeddings

from .protocol import EmbedOptions


class PrecomputedEmbeddings:
    """Precomputed embeddings (LAION style ``img_emb_*.npy`` + ``metadata_*.parquet`` with a
    key column), referenced in place (not copied). When shards are given too, the tar headers
    are scanned for shard/index/size of every key (needed by the write stage), and every
    embedding key must be found in the shards. It has no resume unit: the stage writes the
    sample table in one go (:meth:`write_artifact`).
    """

    streaming = False
    decodes_images = False
    precomputed = True  # the stage writes the artifact with :meth:`write_artifact`, nothing is embedded
    owned = ("keys.parquet", "embeddings.json")

    def __init__(
        self,
        embeddings: Sequence[str],
        metadata: Sequence[str],
        *,
        shards: Sequence[str] | None = None,
        text_embeddings: Sequence[str] = (),
        key_column: str = "key",
        progress: bool = True,
    ):
        self.emb_files = [str(Path(p).resolve()) for p in embeddings]
        self.meta_files = [str(Path(p).resolve()) for p in metadata]
        self.txt_files = [str(Path(p).resolve()) for p in text_embeddings]
        if not self.emb_files:
            raise FileNotFoundError("no precomputed embedding files matched")
        if len(self.meta_files) != len(self.emb_files):
            raise PipelineError(
                f"{len(self.emb_files)} embedding files but {len(self.meta_files)}"
                " metadata files: give one metadata parquet per .npy"
            )
        if self.txt_files and len(self.txt_files) != len(self.emb_files):
            raise PipelineError("text embedding files must pair one-to-one with image ones")
        self.shards = list(shards or [])
        self.key_column = key_column
        self.label = f"{len(self.emb_files)} embedding file(s)"
        self.progress = progress
        self.computed: pa.Table | None = None

    def units(self) -> list[str]:
        return []

    def embed_params(self, encoder, encoder_fingerprint, options: EmbedOptions) -> dict:
        return {"key_column": self.key_column, "kind": "precomputed"}

    def record_inputs(self) -> dict:
        return {
            "embeddings": file_fingerprint(self.emb_files),
            "metadata": file_fingerprint(self.meta_files),
            "texts": file_fingerprint(self.txt_files),
            "shards": file_fingerprint(self.shards),
        }

    def read_keys(self) -> pa.ChunkedArray:
        """The key column of every metadata file (one chunk per file, Arrow strings), checked
        against its embedding file's row count and for repeated keys."""
        key_col = self.key_column
        chunks = []
        for emb_path, meta_path in zip(self.emb_files, self.meta_files):
            arr = open_embeddings(emb_path)
            columns = parquet_columns(meta_path)
            if key_col not in columns:
                raise PipelineError(f"{meta_path} has no {key_col!r} column (columns: {columns[:12]})")
            col = read_parquet(meta_path, columns=[key_col], fix="re-export it, or check --metadata", arrow=True)
            col = col.column(key_col)
            if len(col) != arr.shape[0]:
                raise PipelineError(
                    f"mismatched counts: {emb_path} has {arr.shape[0]} embeddings but {meta_path} has {len(col)} keys"
                )
            chunks.append(pc.cast(col.combine_chunks(), pa.large_string()))
        for emb_path, txt_path in zip(self.emb_files, self.txt_files):
            a, b = open_embeddings(emb_path), open_embeddings(txt_path)
            if a.shape != b.shape:
                raise PipelineError(f"mismatched counts: {emb_path} has shape {a.shape} but {txt_path} has {b.shape}")
        keys = pa.chunked_array(chunks, type=pa.large_string())
        check_unique_keys(keys, self.meta_files)
        release_scratch()  # the parquet decode and sort scratch: the sample table reuses those pages
        return keys

    def write_artifact(self, stage_dir: Path) -> dict:
        """Write the sample table and ``embeddings.json`` into ``stage_dir``; the stage's summary."""
        keys_arr = self.read_keys()
        n = len(keys_arr)
        errors = []
        if self.shards:
            keys = self.locate(pa.table({"key": keys_arr, "row": np.arange(n, dtype=np.int64)}).to_pandas(), errors)
        else:  # straight from Arrow columns: no Python object per key; index and row share one buffer
            zeros = pa.array(np.zeros(n, np.int8))
            rows = np.arange(n, dtype=np.int64)
            keys = pa.table(
                {
                    "key": keys_arr,
                    "shard": pa.DictionaryArray.from_arrays(zeros, pa.array([""])),
                    "shard_idx": np.full(n, -1, np.int64),
                    "index": rows,
                    "nbytes": np.zeros(n, np.int64),
                    "status": pa.DictionaryArray.from_arrays(zeros, pa.array([STATUS_OK])),
                    "row": rows,
                }
            )
        save_parquet(stage_dir / "keys.parquet", keys)
        if isinstance(keys, pa.Table):
            self.computed = keys  # load() converts it without copies instead of reading the file back
        atomic_write_json(
            stage_dir / "embeddings.json", {"images": self.emb_files, "texts": self.txt_files, "shards": self.shards}
        )
        total = keys.num_rows if isinstance(keys, pa.Table) else len(keys)
        return {
            "samples": int(total),
            "embedded": n,
            "precomputed": True,
            "no_embedding": int(total - n),
            "missing_image": 0,
            "undecodable": 0,
            "corrupt_shards": errors,
            "shards": len(self.shards),
        }

    def locate(self, keys: pd.DataFrame, errors: list) -> pd.DataFrame:
        """Shard, index and size of every key from the shards' tar headers (samples the
        embeddings lack get status ``no_embedding``); corrupt-tar messages go to ``errors``."""
        located = []
        for i, shard in enumerate(tqdm(self.shards, desc="scan shards", unit="shard", disable=not self.progress)):
            scan = ShardScan(shard)
            rows = list(iter_shard_headers(shard, scan))
            if scan.error:
                errors.append(scan.error)
            df = pd.DataFrame(rows, columns=["key", "index", "nbytes"])
            df["shard"], df["shard_idx"] = shard, np.int64(i)
            located.append(df)
        per_shard = [pa.array(df["key"], pa.string()) for df in located]
        check_unique_keys(pa.chunked_array(per_shard, pa.string()), self.shards)
        where = pd.concat(located, ignore_index=True)
        merged = where.merge(keys, on="key", how="outer", indicator=True)
        missing = merged[merged["_merge"] == "right_only"]
        if len(missing):
            raise PipelineError(
                f"{len(missing)} embedding keys are not in the shards, e.g. {missing['key'].head(5).tolist()}"
            )
        merged["status"] = np.where(merged["_merge"] == "both", STATUS_OK, NO_EMBEDDING)
        merged["row"] = merged["row"].fillna(-1).astype(np.int64)
        keys = merged.drop(columns="_merge").sort_values(["shard_idx", "index"], kind="stable")
        keys = keys[["key", "shard", "shard_idx", "index", "nbytes", "status", "row"]]
        keys = keys.astype({"index": np.int64, "nbytes": np.int64, "shard_idx": np.int64})
        return keys.reset_index(drop=True)

    def load_artifact(self, stage_dir: Path, digest: str) -> EmbedArtifact:
        """The artifact :meth:`write_artifact` wrote (its table converted without copies when
        written in this process)."""
        keys, self.computed = self.computed, None
        if keys is not None:
            keys = keys.to_pandas(split_blocks=True, types_mapper=string_dtype)
        art = load_embed_artifact(stage_dir, digest, keys)
        if art.keys["row"].max() + 1 != art.n_rows:
            raise PipelineError("embedding rows and keys disagree")
        return art
