"""Pipeline stages: embed -> cluster -> select -> write, each owning one artifact folder.

Every stage has ``params`` (what changes its output) and ``inputs`` (fingerprints of the
upstream artifacts / input files). Its fingerprint is a hash of both. The folder holds
``_stage.json``: ``{"fingerprint", "params", "state": "running"|"done", "summary"}``.

* Same fingerprint and state ``done``: the stage is skipped and its artifact reused.
* Same fingerprint and state ``running`` (a killed run): the stage resumes; embed and write
  keep their finished units (one chunk per input shard; one file per output shard).
* Different fingerprint: the folder is cleared and the stage reruns, which changes its own
  fingerprint and so reruns every stage after it.

All files are written to a temporary name and renamed, so a finished-looking file is a
finished file. Inputs are opened read-only and never modified.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prunecore.cluster import Clustering, kmeans
from prunecore.io import atomic_path
from prunecore.rows import ChunkedRows, open_embeddings

from .shards import (
    IMAGE_EXTS,
    TEXT_EXTS,
    RawSample,
    ShardScan,
    copy_tarinfo,
    file_fingerprint,
    iter_shard,
    iter_shard_headers,
    plan_output_shards,
)

STAGE_FILE = "_stage.json"
VERSION = 1
STATUS_OK = "ok"
# reasons for samples that never reach the selection methods
MISSING_IMAGE = "missing_image"
UNDECODABLE = "undecodable"
NO_EMBEDDING = "no_embedding"


class PipelineError(ValueError):
    """A pipeline input problem that stops the run (the message says what and where)."""


# --------------------------------------------------------------------------- helpers


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


FILE_MODE = 0o644  # atomic_path's temp files are 0600: published artifacts are readable


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
        os.chmod(tmp, FILE_MODE)


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.chmod(tmp, FILE_MODE)


def save_parquet(path: Path, df: pd.DataFrame, metadata: dict | None = None) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): json.dumps(v, default=str).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
        os.chmod(tmp, FILE_MODE)


def die_hook(stage: str, count: int) -> None:
    """Test hook: ``PRUNEKIT_DIE_AFTER="embed:120"`` SIGKILLs this process once ``stage`` has
    processed ``count`` samples in this process (used by the kill/resume tests)."""
    spec = os.environ.get("PRUNEKIT_DIE_AFTER")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == stage and count >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


class Stage:
    """Base class: fingerprinting, skip-if-done, resume, atomic completion marker."""

    name = "stage"

    def __init__(self, out: str | os.PathLike, params: dict, inputs: dict):
        self.out = Path(out)
        self.dir = self.out / self.name
        self.params = params
        self.inputs = inputs
        self.fingerprint = digest({"stage": self.name, "version": VERSION, "params": params, "inputs": inputs})
        self.skipped = False
        self.summary: dict = {}

    def record(self) -> dict | None:
        path = self.dir / STAGE_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None

    def is_done(self) -> bool:
        rec = self.record()
        return bool(rec and rec.get("fingerprint") == self.fingerprint and rec.get("state") == "done")

    def run(self, log=print):
        """Run (or skip, or resume) the stage; return its artifact."""
        rec = self.record()
        if rec and rec.get("fingerprint") == self.fingerprint and rec.get("state") == "done":
            self.skipped = True
            self.summary = rec.get("summary", {})
            log(f"[{self.name}] up to date, skipped ({self.dir})")
            return self.load()
        if rec is None or rec.get("fingerprint") != self.fingerprint:
            if self.dir.exists():
                log(f"[{self.name}] parameters or inputs changed: recomputing")
                shutil.rmtree(self.dir)
        else:
            log(f"[{self.name}] resuming an interrupted run")
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.rglob(".*.tmp"):
            stale.unlink()
        for stale in self.dir.rglob(".*.partial"):
            stale.unlink()
        write_json(
            self.dir / STAGE_FILE,
            {"fingerprint": self.fingerprint, "state": "running", "params": self.params, "inputs": self.inputs},
        )
        t0 = time.perf_counter()
        self.summary = self.compute(log) or {}
        self.summary["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(
            self.dir / STAGE_FILE,
            {
                "fingerprint": self.fingerprint,
                "state": "done",
                "params": self.params,
                "inputs": self.inputs,
                "summary": self.summary,
            },
        )
        return self.load()

    def compute(self, log) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self):  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------- embed


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


def _open_rows(paths: list[Path]):
    arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths]
    arrays = [a for a in arrays if a.shape[0] > 0]
    if not arrays:
        raise PipelineError("no sample produced an embedding (all missing or undecodable)")
    return arrays[0] if len(arrays) == 1 else ChunkedRows(arrays)


def load_embed_artifact(stage_dir: Path, fingerprint: str) -> EmbedArtifact:
    index = json.loads((stage_dir / "embeddings.json").read_text())
    keys = pd.read_parquet(stage_dir / "keys.parquet")

    def resolve(p):
        return Path(p) if os.path.isabs(p) else stage_dir / p

    images = _open_rows([resolve(p) for p in index["images"]])
    texts = _open_rows([resolve(p) for p in index["texts"]]) if index.get("texts") else None
    n_ok = int((keys["row"] >= 0).sum())
    if images.shape[0] != n_ok or (texts is not None and texts.shape[0] != n_ok):
        raise PipelineError(f"{stage_dir}: {images.shape[0]} embedding rows but {n_ok} keys with an embedding")
    return EmbedArtifact(stage_dir, keys, images, texts, index.get("shards", []), fingerprint)


def decode_image(data: bytes):
    """PIL RGB image from encoded bytes (raises on undecodable data)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def embed_shard(
    shard: str,
    encoder,
    *,
    batch_size: int,
    image_exts: Sequence[str],
    text: bool,
    strict: bool,
    progress=None,
    on_sample=None,
) -> tuple[pd.DataFrame, np.ndarray | None, np.ndarray | None, ShardScan]:
    """Embed one shard: (sample table, image rows (m, d) f32, text rows or None, scan).

    Batches never cross shards, so a shard's rows are the same whichever process (local,
    resumed, Ray worker) computes them.
    """
    scan = ShardScan(shard)
    records, img_chunks, txt_chunks = [], [], []
    batch_imgs, batch_txts = [], []

    def flush():
        if batch_imgs:
            img_chunks.append(np.asarray(encoder.encode_images(batch_imgs), dtype=np.float32))
            if text:
                txt_chunks.append(np.asarray(encoder.encode_texts(batch_txts), dtype=np.float32))
            if progress is not None:
                progress.update(len(batch_imgs))
            batch_imgs.clear()
            batch_txts.clear()

    for sample in iter_shard(shard, scan):
        status = STATUS_OK
        found = sample.get(image_exts)
        if found is None:
            status = MISSING_IMAGE
            if strict:
                raise PipelineError(
                    f"sample {sample.key!r} in {shard} has no image member "
                    f"(looked for {'/'.join(image_exts)}; it has "
                    f"{sorted(sample.members)})"
                )
        else:
            try:
                image = decode_image(found[1])
            except Exception as exc:  # PIL raises many types for bad data
                status = UNDECODABLE
                if strict:
                    raise PipelineError(f"undecodable image {sample.key}.{found[0]} in {shard}: {exc}") from exc
        caption = ""
        if text and status == STATUS_OK:
            cap = sample.get(TEXT_EXTS)
            caption = cap[1].decode("utf-8", errors="replace") if cap else ""
        records.append((sample.key, sample.index, sample.nbytes, status))
        if status == STATUS_OK:
            batch_imgs.append(image)
            batch_txts.append(caption)
            if len(batch_imgs) == batch_size:
                flush()
        if on_sample is not None:
            on_sample()
    flush()
    if scan.error and strict:
        raise PipelineError(scan.error)
    table = pd.DataFrame(records, columns=["key", "index", "nbytes", "status"])
    table["index"] = table["index"].astype(np.int64)
    table["nbytes"] = table["nbytes"].astype(np.int64)
    images = np.concatenate(img_chunks) if img_chunks else None
    texts = np.concatenate(txt_chunks) if txt_chunks else None
    return table, images, texts, scan


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
    save_parquet(paths["keys"], table, {"scan": {"error": scan.error, "skipped_members": scan.skipped_members}})


def finalize_embed(stage_dir: Path, shards: list[str], *, text: bool) -> dict:
    """Merge per-shard chunk tables into keys.parquet, check keys, write embeddings.json."""
    tables, errors, skipped = [], [], 0
    images, texts = [], []
    for i, shard in enumerate(shards):
        paths = chunk_paths(stage_dir, i)
        t = pq.read_table(paths["keys"])
        scan = json.loads((t.schema.metadata or {}).get(b"scan", b"{}"))
        if scan.get("error"):
            errors.append(scan["error"])
        skipped += int(scan.get("skipped_members", 0))
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
    write_json(stage_dir / "embeddings.json", {"images": images, "texts": texts, "shards": shards})
    counts = keys["status"].value_counts().to_dict()
    return {
        "samples": int(len(keys)),
        "embedded": int(ok.sum()),
        "missing_image": int(counts.get(MISSING_IMAGE, 0)),
        "undecodable": int(counts.get(UNDECODABLE, 0)),
        "corrupt_shards": errors,
        "skipped_members": skipped,
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


class EmbedStage(Stage):
    """Decode images from shards and embed them; one chunk (rows + keys) per input shard.

    params: encoder fingerprint, batch_size, image_exts, text (embed captions too), dtype,
    strict. Resume unit: one input shard.
    """

    name = "embed"

    def __init__(
        self,
        out,
        shards: list[str],
        encoder=None,
        *,
        encoder_fingerprint=None,
        batch_size: int = 64,
        image_exts: Sequence[str] = IMAGE_EXTS,
        text: bool = False,
        dtype: str = "float16",
        strict: bool = False,
        progress: bool = True,
        backend=None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        fp = encoder_fingerprint if encoder_fingerprint is not None else encoder.fingerprint
        params = {
            "encoder": fp,
            "batch_size": batch_size,
            "image_exts": list(image_exts),
            "text": bool(text),
            "dtype": dtype,
            "strict": bool(strict),
        }
        super().__init__(out, params, {"shards": file_fingerprint(shards)})
        self.shards = list(shards)
        self.encoder = encoder
        self.progress = progress
        self.backend = backend

    def pending(self) -> list[int]:
        return [i for i in range(len(self.shards)) if not chunk_paths(self.dir, i)["keys"].exists()]

    def compute(self, log):
        todo = self.pending()
        if todo and self.backend is not None:
            self.backend.embed(self, todo)
        elif todo:
            self._embed_local(todo)
        return finalize_embed(self.dir, self.shards, text=self.params["text"])

    def encoder_obj(self):
        if callable(self.encoder) and not hasattr(self.encoder, "encode_images"):
            self.encoder = self.encoder()  # a factory: build lazily (skipped stages never load)
        return self.encoder

    def embed_one(self, i: int, progress=None, on_sample=None) -> None:
        encoder = self.encoder_obj()
        if self.params["text"] and not getattr(encoder, "has_text", False):
            raise PipelineError("caption embeddings requested (CLIP score) but the encoder has no text tower")
        table, images, texts, scan = embed_shard(
            self.shards[i],
            encoder,
            batch_size=self.params["batch_size"],
            image_exts=tuple(self.params["image_exts"]),
            text=self.params["text"],
            strict=self.params["strict"],
            progress=progress,
            on_sample=on_sample,
        )
        dim = None
        if images is None:  # nothing decodable in this shard: width from another chunk
            dim = _known_width(self.dir) or _probe_width(encoder)
        save_chunk(
            self.dir,
            i,
            table,
            images,
            texts,
            scan,
            dim=dim,
            dtype=np.dtype(self.params["dtype"]),
            text=self.params["text"],
        )
        if scan.error:
            tqdm.write(f"[embed] WARNING {scan.error}")

    def _embed_local(self, todo: list[int]) -> None:
        done = [0]

        def on_sample():
            done[0] += 1
            die_hook("embed", done[0])

        bar = tqdm(desc="embed", unit="img", disable=not self.progress)
        with bar:
            for i in tqdm(todo, desc="embed shards", unit="shard", disable=not self.progress, leave=False):
                self.embed_one(i, progress=bar, on_sample=on_sample)

    def load(self) -> EmbedArtifact:
        return load_embed_artifact(self.dir, self.fingerprint)


def _known_width(stage_dir: Path) -> int | None:
    for p in sorted((stage_dir / "chunks").glob("*.img.npy")):
        arr = np.load(p, mmap_mode="r")
        if arr.shape[0]:
            return int(arr.shape[1])
    return None


def _probe_width(encoder) -> int:
    from PIL import Image

    return int(np.asarray(encoder.encode_images([Image.new("RGB", (32, 32))])).shape[1])


class IngestStage(Stage):
    """Precomputed embeddings (LAION style ``img_emb_*.npy`` + ``metadata_*.parquet`` with a
    key column), referenced in place (not copied). When shards are given too, the tar headers
    are scanned for shard/index/size of every key (needed by the write stage), and every
    embedding key must be found in the shards.
    """

    name = "embed"

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
            meta = pd.read_parquet(meta_path)
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
        write_json(
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
        art = load_embed_artifact(self.dir, self.fingerprint)
        if art.keys["row"].max() + 1 != art.n_rows:
            raise PipelineError("embedding rows and keys disagree")
        return art


# --------------------------------------------------------------------------- cluster


@dataclass
class ClusterArtifact:
    """centroids (k, d) f32; labels (n,) i64 and sim (n,) f32 per embedding row."""

    dir: Path
    clustering: Clustering
    fingerprint: str


class ClusterStage(Stage):
    """Spherical k-means on a seeded sample (k * max_points_per_centroid rows), then
    streaming assignment of every row (:func:`prunecore.kmeans`)."""

    name = "cluster"

    def __init__(
        self,
        out,
        embed: EmbedArtifact,
        *,
        k: int,
        niter: int = 20,
        seed: int = 1234,
        max_points_per_centroid: int = 256,
        device: str = "auto",
    ):
        params = {
            "k": int(k),
            "niter": int(niter),
            "seed": int(seed),
            "max_points_per_centroid": int(max_points_per_centroid),
        }
        super().__init__(out, params, {"embed": embed.fingerprint})
        self.embed = embed
        self.device = device

    def compute(self, log):
        n = self.embed.n_rows
        if self.params["k"] > n:
            raise PipelineError(f"--clusters {self.params['k']} is more than the {n} embedded samples: lower it")
        log(f"[cluster] k-means k={self.params['k']} on {n:,d} rows")
        clu = kmeans(
            self.embed.images,
            self.params["k"],
            niter=self.params["niter"],
            seed=self.params["seed"],
            max_points_per_centroid=self.params["max_points_per_centroid"],
            device=self.device,
        )
        save_npy(self.dir / "centroids.npy", clu.centroids)
        save_parquet(
            self.dir / "assign.parquet",
            pd.DataFrame({"row": np.arange(n, dtype=np.int64), "cluster": clu.labels, "sim": clu.sim}),
            {"kmeans": clu.params},
        )
        sizes = clu.sizes
        return {
            "k": clu.k,
            "n_train": clu.params["n_train"],
            "empty_clusters": int((sizes == 0).sum()),
            "largest_cluster": int(sizes.max()),
            "median_cluster": float(np.median(sizes)),
        }

    def load(self) -> ClusterArtifact:
        centroids = np.load(self.dir / "centroids.npy")
        table = pq.read_table(self.dir / "assign.parquet")
        df = table.to_pandas()
        params = json.loads((table.schema.metadata or {}).get(b"kmeans", b"{}"))
        clu = Clustering(
            centroids=centroids,
            labels=df["cluster"].to_numpy(np.int64),
            sim=df["sim"].to_numpy(np.float32),
            params=params,
        )
        return ClusterArtifact(self.dir, clu, self.fingerprint)


# --------------------------------------------------------------------------- select


class RowSubset(ChunkedRows):
    """Lazy view of rows ``idx`` (m,) of a row source (n, d): only rows asked for are read."""

    def __init__(self, base, idx: np.ndarray):  # noqa: D107 - no ChunkedRows.__init__
        self.base = base
        self.idx = np.asarray(idx, dtype=np.int64)
        self.shape = (int(self.idx.shape[0]), int(base.shape[1]))
        self.dtype = base.dtype
        self.ndim = 2
        self.chunks = []

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        picked = self.idx[rows]
        if isinstance(self.base, ChunkedRows):
            return self.base.take(picked)
        return np.asarray(self.base[picked])


def subset_rows(rows, idx: np.ndarray):
    """``rows[idx]`` as a lazy view (identity when idx covers every row in order)."""
    if idx.shape[0] == rows.shape[0]:
        return rows
    return RowSubset(rows, idx)


STEP_DEFAULTS = {
    "clipscore": {"min": None, "keep": None},
    "semdedup": {"eps": 0.05, "order": "hard", "rule": "reference", "block_size": None},
    "dbp": {
        "keep": 0.3,
        "temperature": 0.5,
        "n_neighbors": 20,
        "balance": 0.0,
        "order": "hard",
        "min_per_cluster": 1,
        "seed": 1234,
    },
    "ssp": {"keep": 0.5, "mode": "hard"},
    "random": {"keep": 0.5, "seed": 1234},
}


def normalize_steps(steps: Sequence[dict]) -> list[dict]:
    """Fill defaults and check step names/params. A step is ``{"method": name, ...params}``."""
    out = []
    for step in steps:
        step = dict(step)
        method = step.pop("method", None)
        if method not in STEP_DEFAULTS:
            raise ValueError(f"unknown selection method {method!r}; choose from {sorted(STEP_DEFAULTS)}")
        unknown = set(step) - set(STEP_DEFAULTS[method])
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {method}")
        full = {"method": method, **STEP_DEFAULTS[method], **step}
        if method == "clipscore" and (full["min"] is None) == (full["keep"] is None):
            raise ValueError("clipscore needs exactly one of min (threshold) or keep (fraction)")
        out.append(full)
    return out


def run_step(step: dict, rows, clustering: Clustering, texts=None, *, device="auto", progress=False):
    """One selection method over ``rows`` (m, d) with their clustering: a Selection (m,)."""
    from dataprune import Selection, prune_dbp, prune_ssp, random_subset, semdedup

    m = step["method"]
    if m == "semdedup":
        return semdedup(
            rows,
            step["eps"],
            clustering=clustering,
            order=step["order"],
            rule=step["rule"],
            block_size=step["block_size"],
            device=device,
            progress=progress,
        )
    if m == "dbp":
        return prune_dbp(
            rows,
            step["keep"],
            clustering=clustering,
            temperature=step["temperature"],
            n_neighbors=step["n_neighbors"],
            balance=step["balance"],
            order=step["order"],
            min_per_cluster=step["min_per_cluster"],
            seed=step["seed"],
            device=device,
        )
    if m == "ssp":
        return prune_ssp(rows, step["keep"], clustering=clustering, mode=step["mode"])
    if m == "random":
        return random_subset(rows.shape[0], step["keep"], seed=step["seed"])
    if m == "clipscore":
        if texts is None:
            raise PipelineError(
                "clipscore needs caption embeddings: embed with a CLIP model "
                "and text=True (CLI: --clip-score-min/--clip-score-keep)"
            )
        scores = clip_scores(rows, texts)
        from prunecore.budget import keep_count, top_k_mask

        if step["min"] is not None:
            keep = scores >= step["min"]
        else:
            keep = top_k_mask(scores, keep_count(len(scores), step["keep"]))
        return Selection.from_mask(keep, "low_clip_score", scores=scores)
    raise ValueError(m)


def clip_scores(images, texts, batch_size: int = 65536) -> np.ndarray:
    """Cosine between each row's image and caption embeddings, streamed: (n,) float32."""
    from prunecore.cluster import l2_normalize

    n = images.shape[0]
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        a = l2_normalize(np.asarray(images[s:e], dtype=np.float32), row_ids=s)
        b = l2_normalize(np.asarray(texts[s:e], dtype=np.float32), row_ids=s)
        out[s:e] = np.einsum("nd,nd->n", a, b)
    return out


def select_chain(
    embed: EmbedArtifact, clustering: Clustering, steps: list[dict], *, device="auto", progress=False, step_runner=None
):
    """Run the steps in order, each on the survivors of the previous ones; returns the
    composed Selection over all embedding rows and {step name: stats DataFrame}."""
    from dataprune import Selection

    n = embed.n_rows
    sel = Selection.keep_all(n)
    stats = {}
    for i, step in enumerate(steps):
        idx = sel.indices
        if idx.size == 0:
            break
        sub_clu = Clustering(clustering.centroids, clustering.labels[idx], clustering.sim[idx], clustering.params)
        sub_rows = subset_rows(embed.images, idx)
        sub_txt = subset_rows(embed.texts, idx) if embed.texts is not None else None
        runner = step_runner or run_step
        s = runner(step, sub_rows, sub_clu, sub_txt, device=device, progress=progress)
        for name, df in s.stats.items():
            stats[f"{i}_{name}"] = df
        sel = sel & s.lift(idx, n)
    return sel, stats


@dataclass
class SelectArtifact:
    dir: Path
    keep: pd.DataFrame  # key, shard, kept, reason, cluster, score, row, shard_idx, index
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""


class SelectStage(Stage):
    """Score/select chain -> keep-list parquet (every input sample, with its reason)."""

    name = "select"

    def __init__(
        self,
        out,
        embed: EmbedArtifact,
        cluster: ClusterArtifact,
        steps: list[dict],
        *,
        device="auto",
        progress=True,
        backend=None,
    ):
        steps = normalize_steps(steps)
        super().__init__(out, {"steps": steps}, {"embed": embed.fingerprint, "cluster": cluster.fingerprint})
        self.embed, self.cluster, self.steps = embed, cluster, steps
        self.device, self.progress, self.backend = device, progress, backend

    def compute(self, log):
        if self.backend is not None:
            sel, stats = self.backend.select(self.embed, self.cluster.clustering, self.steps)
        else:
            sel, stats = select_chain(
                self.embed, self.cluster.clustering, self.steps, device=self.device, progress=self.progress
            )
        keep = build_keep_list(self.embed.keys, sel, self.cluster.clustering)
        for name, df in stats.items():
            save_parquet(self.dir / f"stats_{name}.parquet", df.reset_index(drop=True))
        save_parquet(self.dir / "keep.parquet", keep)
        counts = keep.loc[~keep["kept"], "reason"].value_counts().to_dict()
        return {
            "samples": int(len(keep)),
            "kept": int(keep["kept"].sum()),
            "dropped": {str(k): int(v) for k, v in sorted(counts.items())},
        }

    def load(self) -> SelectArtifact:
        stats = {p.stem[len("stats_") :]: pd.read_parquet(p) for p in sorted(self.dir.glob("stats_*.parquet"))}
        return SelectArtifact(self.dir, pd.read_parquet(self.dir / "keep.parquet"), stats, self.fingerprint)


def build_keep_list(keys: pd.DataFrame, sel, clustering: Clustering) -> pd.DataFrame:
    """One row per input sample (input order): key, shard, kept, reason, cluster, score,
    plus row (embedding row or -1), shard_idx, index and nbytes (for the write stage)."""
    row = keys["row"].to_numpy(np.int64)
    has = row >= 0
    kept = np.zeros(len(keys), dtype=bool)
    reason = keys["status"].to_numpy(dtype=object).copy()
    cluster = np.full(len(keys), -1, dtype=np.int64)
    score = np.full(len(keys), np.nan, dtype=np.float32)
    kept[has] = sel.keep[row[has]]
    reason[has] = sel.reasons[row[has]]
    cluster[has] = clustering.labels[row[has]]
    score[has] = sel.scores[row[has]]
    return pd.DataFrame(
        {
            "key": keys["key"].to_numpy(),
            "shard": keys["shard"].to_numpy(),
            "kept": kept,
            "reason": reason.astype(str),
            "cluster": cluster,
            "score": score,
            "row": row,
            "shard_idx": keys["shard_idx"].to_numpy(np.int64),
            "index": keys["index"].to_numpy(np.int64),
            "nbytes": keys["nbytes"].to_numpy(np.int64),
        }
    )


# --------------------------------------------------------------------------- write


class WriteStage(Stage):
    """Kept samples -> output shards (byte-identical members) + manifest.

    The output layout is planned up front from the keep-list (sizes come from the tar
    headers), so output shard j always holds the same samples; each output shard is written
    to a temporary file and renamed, then a small ``done/j.json`` records it. Resume unit:
    one output shard.
    """

    name = "write"

    def __init__(
        self,
        out,
        select: SelectArtifact,
        shards: list[str],
        *,
        max_count: int = 10000,
        max_size: int = 3_000_000_000,
        prefix: str = "shard",
        progress: bool = True,
        backend=None,
    ):
        params = {"max_count": int(max_count), "max_size": int(max_size), "prefix": prefix}
        super().__init__(out, params, {"select": select.fingerprint, "shards": file_fingerprint(shards)})
        self.select, self.shards = select, list(shards)
        self.progress, self.backend = progress, backend

    def out_name(self, j: int) -> str:
        return f"{self.params['prefix']}-{j:06d}.tar"

    def plan(self) -> pd.DataFrame:
        keep = self.select.keep
        kept = keep[keep["kept"]].sort_values(["shard_idx", "index"], kind="stable")
        if len(kept) and (kept["shard_idx"] < 0).any():
            raise PipelineError(
                "the keep-list has no shard locations (embeddings were ingested "
                "without shards): pass the shards to write filtered copies"
            )
        plan = kept[["key", "shard", "shard_idx", "index"]].copy()
        plan["out_shard"] = np.asarray(
            plan_output_shards(
                kept["nbytes"].to_numpy(), max_count=self.params["max_count"], max_size=self.params["max_size"]
            ),
            dtype=np.int64,
        )
        return plan.reset_index(drop=True)

    def compute(self, log):
        plan = self.plan()
        plan_path = self.dir / "plan.parquet"
        if not plan_path.exists():
            save_parquet(plan_path, plan)
        n_out = int(plan["out_shard"].max()) + 1 if len(plan) else 0
        (self.dir / "done").mkdir(exist_ok=True)
        todo = [j for j in range(n_out) if not (self.dir / "done" / f"{j:06d}.json").exists()]
        if todo and self.backend is not None:
            self.backend.write(self, plan, todo)
        elif todo:
            write_outputs(self, plan, todo, progress=self.progress)
        records = [json.loads((self.dir / "done" / f"{j:06d}.json").read_text()) for j in range(n_out)]
        manifest = {
            "shards": records,
            "samples": int(len(plan)),
            "bytes": int(sum(r["bytes"] for r in records)),
            "max_count": self.params["max_count"],
            "max_size": self.params["max_size"],
        }
        write_json(self.dir / "manifest.json", manifest)
        return {"output_shards": n_out, "samples": int(len(plan)), "bytes": manifest["bytes"]}

    def load(self) -> dict:
        manifest = json.loads((self.dir / "manifest.json").read_text())
        manifest["paths"] = [str(self.dir / r["file"]) for r in manifest["shards"]]
        return manifest


class _HashingFile:
    """Write-only file wrapper that hashes what goes through it."""

    def __init__(self, fh):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.n += len(data)
        return self.fh.write(data)

    def tell(self):
        return self.n

    def flush(self):
        self.fh.flush()


class OutputShard:
    """One output tar being written under a temporary name; ``close()`` renames it and
    records ``done/j.json`` (file, samples, bytes, sha256)."""

    def __init__(self, stage_dir: Path, j: int, name: str):
        import tarfile

        self.stage_dir, self.j, self.name = stage_dir, j, name
        self.tmp = stage_dir / f".{name}.partial"
        self.fh = open(self.tmp, "wb")
        self.hf = _HashingFile(self.fh)
        self.tar = tarfile.open(fileobj=self.hf, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, sample: RawSample) -> None:
        for info, data in sample.members.values():
            self.tar.addfile(copy_tarinfo(info, len(data)), io.BytesIO(data))
        self.count += 1

    def close(self) -> dict:
        self.tar.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.stage_dir / self.name)
        rec = {
            "index": self.j,
            "file": self.name,
            "samples": self.count,
            "bytes": self.hf.n,
            "sha256": self.hf.sha.hexdigest(),
        }
        write_json(self.stage_dir / "done" / f"{self.j:06d}.json", rec)
        return rec


def write_outputs(stage: WriteStage, plan: pd.DataFrame, todo: Sequence[int], *, progress=True) -> None:
    """Write output shards ``todo`` in one pass over the input shards they need."""
    todo_set = set(int(j) for j in todo)
    part = plan[plan["out_shard"].isin(todo_set)]
    want = {
        (int(s), int(i)): (int(j), key)
        for key, s, i, j in part[["key", "shard_idx", "index", "out_shard"]].itertuples(index=False)
    }
    remaining = part["out_shard"].value_counts().to_dict()
    open_shards: dict[int, OutputShard] = {}
    written = 0
    bar = tqdm(total=len(part), desc="write", unit="img", disable=not progress)
    with bar:
        for s in sorted(part["shard_idx"].unique().tolist()):
            shard = stage.shards[s]
            scan = ShardScan(shard)
            for sample in iter_shard(shard, scan):
                hit = want.get((s, sample.index))
                if hit is None:
                    continue
                j, key = hit
                if sample.key != key:
                    raise PipelineError(
                        f"{shard} changed since it was embedded: sample {sample.index} is {sample.key!r}"
                    )
                if j not in open_shards:
                    open_shards[j] = OutputShard(stage.dir, j, stage.out_name(j))
                open_shards[j].add(sample)
                remaining[j] -= 1
                written += 1
                bar.update(1)
                if remaining[j] == 0:
                    open_shards.pop(j).close()
                die_hook("write", written)
    unfinished = [j for j, v in remaining.items() if v > 0]
    if unfinished:
        raise PipelineError(
            f"input shards ended before all kept samples were written (output "
            f"shards {unfinished[:5]}): were the shards modified?"
        )
