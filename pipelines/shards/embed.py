"""The embed stage: decode images from shards and embed them, one chunk per input shard.

Artifact (``OUT/embed/``): ``chunks/{i}.img.npy`` (+ ``.txt.npy``) and ``chunks/{i}.keys.parquet``
per input shard, ``keys.parquet`` (every sample, input order), ``embeddings.json``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prunecore.io import atomic_write_json
from prunecore.rows import ChunkedRows

from .stage import (
    MISSING_IMAGE,
    STATUS_OK,
    UNDECODABLE,
    PipelineError,
    Stage,
    die_hook,
    read_parquet,
    save_npy,
    save_parquet,
)
from .tario import (
    IMAGE_EXTS,
    NAME_COUNTERS,
    NO_IMAGE,
    NON_UTF8_NAME,
    TEXT_EXTS,
    ShardScan,
    file_fingerprint,
    iter_shard,
    sample_problem,
)


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


def load_embed_artifact(stage_dir: Path, fingerprint: str, keys: pd.DataFrame | None = None) -> EmbedArtifact:
    """The embed stage's artifact; ``keys``: the sample table when the caller holds it already."""
    index = json.loads((stage_dir / "embeddings.json").read_text())
    keys = read_parquet(stage_dir / "keys.parquet") if keys is None else keys

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
        status = sample_problem(sample) or STATUS_OK  # no_image / non_utf8_name, from the tar
        found = sample.get(image_exts)
        if status == STATUS_OK and found is None:
            status = MISSING_IMAGE
            if strict:
                raise PipelineError(
                    f"sample {sample.key!r} in {shard} has no image member "
                    f"(looked for {'/'.join(image_exts)}; it has "
                    f"{sorted(sample.members)})"
                )
        elif status == STATUS_OK:
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


class EmbedStage(Stage):
    """Decode images from shards and embed them; one chunk (rows + keys) per input shard.

    params: encoder fingerprint, batch_size, image_exts, text (embed captions too), dtype,
    strict. Resume unit: one input shard. ``executor``: who embeds the pending shards
    (``None``: this process; see :mod:`pipelines.executors`).
    """

    name = "embed"
    owned = ("keys.parquet", "embeddings.json", "chunks/*.npy", "chunks/*.parquet")

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
        executor=None,
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
        self.executor = executor

    def pending(self) -> list[int]:
        return [i for i in range(len(self.shards)) if not chunk_paths(self.dir, i)["keys"].exists()]

    def compute(self, log):
        todo = self.pending()
        if todo and self.executor is not None:
            self.executor.embed(self, todo)
        elif todo:
            self.embed_local(todo)
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

    def embed_local(self, todo: list[int]) -> None:
        """Embed input shards ``todo`` in this process, one after the other."""
        done = [0]

        def on_sample():
            done[0] += 1
            die_hook("embed", done[0])

        bar = tqdm(desc="embed", unit="img", disable=not self.progress)
        with bar:
            for i in tqdm(todo, desc="embed shards", unit="shard", disable=not self.progress, leave=False):
                self.embed_one(i, progress=bar, on_sample=on_sample)

    def load(self) -> EmbedArtifact:
        return load_embed_artifact(self.dir, self.digest)

    def invalidate(self, rels: list[str]) -> None:
        """A changed chunk file: delete its whole chunk, so that input shard is embedded again."""
        for rel in rels:
            stem = rel.split("/")[-1].split(".")[0]
            for path in chunk_paths(self.dir, int(stem)).values() if rel.startswith("chunks/") else [self.dir / rel]:
                path.unlink(missing_ok=True)


def _known_width(stage_dir: Path) -> int | None:
    for p in sorted((stage_dir / "chunks").glob("*.img.npy")):
        arr = np.load(p, mmap_mode="r")
        if arr.shape[0]:
            return int(arr.shape[1])
    return None


def _probe_width(encoder) -> int:
    from PIL import Image

    return int(np.asarray(encoder.encode_images([Image.new("RGB", (32, 32))])).shape[1])
