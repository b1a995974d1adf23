"""The ingest stage: precomputed embeddings in place of the embed stage (same artifact)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from prunecore.io import atomic_write_json
from prunecore.rows import open_embeddings

from .embed import EmbedArtifact, check_duplicate_keys, load_embed_artifact
from .stage import NO_EMBEDDING, STATUS_OK, PipelineError, Stage, read_parquet, save_parquet
from .tario import ShardScan, file_fingerprint, iter_shard_headers


class IngestStage(Stage):
    """Precomputed embeddings (LAION style ``img_emb_*.npy`` + ``metadata_*.parquet`` with a
    key column), referenced in place (not copied). When shards are given too, the tar headers
    are scanned for shard/index/size of every key (needed by the write stage), and every
    embedding key must be found in the shards.
    """

    name = "embed"
    owned = ("keys.parquet", "embeddings.json")

    def __init__(
        self,
        out,
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
        params = {"key_column": key_column, "kind": "precomputed"}
        inputs = {
            "embeddings": file_fingerprint(self.emb_files),
            "metadata": file_fingerprint(self.meta_files),
            "texts": file_fingerprint(self.txt_files),
            "shards": file_fingerprint(self.shards),
        }
        super().__init__(out, params, inputs)
        self.progress = progress

    def compute(self, log):
        key_col = self.params["key_column"]
        metas = []
        for emb_path, meta_path in zip(self.emb_files, self.meta_files):
            arr = open_embeddings(emb_path)
            meta = read_parquet(meta_path, fix="re-export it, or check that --metadata lists the right files")
            if key_col not in meta.columns:
                raise PipelineError(f"{meta_path} has no {key_col!r} column (columns: {list(meta.columns)[:12]})")
            if len(meta) != arr.shape[0]:
                raise PipelineError(
                    f"mismatched counts: {emb_path} has {arr.shape[0]} embeddings but {meta_path} has {len(meta)} keys"
                )
            metas.append(meta[[key_col]].rename(columns={key_col: "key"}).astype({"key": str}))
        for emb_path, txt_path in zip(self.emb_files, self.txt_files):
            a, b = open_embeddings(emb_path), open_embeddings(txt_path)
            if a.shape != b.shape:
                raise PipelineError(f"mismatched counts: {emb_path} has shape {a.shape} but {txt_path} has {b.shape}")
        keys = pd.concat(metas, ignore_index=True)
        keys["row"] = np.arange(len(keys), dtype=np.int64)
        check_duplicate_keys(keys)
        errors = []
        if self.shards:
            located = []
            for i, shard in enumerate(tqdm(self.shards, desc="scan shards", unit="shard", disable=not self.progress)):
                scan = ShardScan(shard)
                rows = list(iter_shard_headers(shard, scan))
                if scan.error:
                    errors.append(scan.error)
                df = pd.DataFrame(rows, columns=["key", "index", "nbytes"])
                df["shard"], df["shard_idx"] = shard, np.int64(i)
                located.append(df)
            where = pd.concat(located, ignore_index=True)
            check_duplicate_keys(where)
            merged = where.merge(keys, on="key", how="outer", indicator=True)
            missing = merged[merged["_merge"] == "right_only"]
            if len(missing):
                raise PipelineError(
                    f"{len(missing)} embedding keys are not in the shards, e.g. {missing['key'].head(5).tolist()}"
                )
            merged["status"] = np.where(merged["_merge"] == "both", STATUS_OK, NO_EMBEDDING)
            merged["row"] = merged["row"].fillna(-1).astype(np.int64)
            keys = merged.drop(columns="_merge").sort_values(["shard_idx", "index"], kind="stable")
        else:
            keys["shard"], keys["shard_idx"] = "", np.int64(-1)
            keys["index"], keys["nbytes"] = keys["row"], np.int64(0)
            keys["status"] = STATUS_OK
        keys = keys[["key", "shard", "shard_idx", "index", "nbytes", "status", "row"]]
        keys = keys.astype({"index": np.int64, "nbytes": np.int64, "shard_idx": np.int64})
        save_parquet(self.dir / "keys.parquet", keys.reset_index(drop=True))
        atomic_write_json(
            self.dir / "embeddings.json", {"images": self.emb_files, "texts": self.txt_files, "shards": self.shards}
        )
        n_ok = int((keys["status"] == STATUS_OK).sum())
        return {
            "samples": int(len(keys)),
            "embedded": n_ok,
            "precomputed": True,
            "no_embedding": int(len(keys) - n_ok),
            "missing_image": 0,
            "undecodable": 0,
            "corrupt_shards": errors,
            "shards": len(self.shards),
        }

    def load(self) -> EmbedArtifact:
        art = load_embed_artifact(self.dir, self.digest)
        if art.keys["row"].max() + 1 != art.n_rows:
            raise PipelineError("embedding rows and keys disagree")
        return art
