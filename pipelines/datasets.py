"""Hugging Face datasets and parquet tables as pipeline input and output.

``run_filter(hf_dataset=PATH_OR_DATASET, ...)`` / ``prunekit filter --hf-dataset PATH``
embeds the rows of a local dataset (a ``save_to_disk`` folder, a folder of parquet / arrow /
webdataset files, such files or a glob of them, or a ``datasets.Dataset`` object), runs the
same cluster and select stages as for tar shards, and writes the kept rows as a new dataset.

* **embed** (:class:`DatasetEmbedStage`, the embed stage's artifact): either the image column
  is decoded and encoded with the tar path's encoder and functions (same batching, same
  resume unit semantics: one chunk of ``chunk_rows`` rows), or an embedding column is read
  straight from Arrow (a fixed-size list of floats becomes a numpy view of the Arrow buffer,
  no copy) into the chunk files. Keys are the id column (as strings) or the row index.
* **write** (:class:`DatasetWriteStage`): the kept rows, in input order, byte-identical
  (the Arrow rows are copied, never decoded), as a ``save_to_disk`` folder or parquet shards
  under ``OUT/write/dataset``, built in ``OUT/write/dataset.incomplete`` and renamed.

Streaming (``IterableDataset``) inputs are not supported yet (:data:`STREAMING_UNSUPPORTED`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipelines.shards.embed import EmbedStage, decode_image, save_chunk
from pipelines.shards.select import SelectArtifact
from pipelines.shards.stage import (
    MISSING_IMAGE,
    NO_EMBEDDING,
    STATUS_OK,
    UNDECODABLE,
    PipelineError,
    Stage,
    die_hook,
)
from pipelines.shards.tario import ShardScan, file_fingerprint, plan_output_shards
from prunecore.io import atomic_path, atomic_write_json, file_digest

DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
OUTPUT_FORMATS = ("disk", "parquet")
DEFAULT_CHUNK_ROWS = 10_000
WRITE_BATCH_ROWS = 1_000
STREAMING_UNSUPPORTED = (
    "streaming datasets (IterableDataset) are not supported yet: load the dataset without "
    "streaming=True (a map-style Dataset is memory-mapped from disk, so it needs disk space, not memory)"
)


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def hf_progress(enabled: bool):
    """``datasets``' own progress bars on or off inside the block (restored after)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if enabled:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_disabled:
            datasets.disable_progress_bars()
        else:
            datasets.enable_progress_bars()


def load_local_dataset(source, split: str | None = None, *, cache_dir: str | None = None):
    """A map-style ``datasets.Dataset`` from ``source``.

    source: a ``Dataset`` / ``DatasetDict``; a ``save_to_disk`` folder; a folder of data files
    (``load_dataset(folder)``); a ``.parquet`` / ``.arrow`` / ``.tar`` (webdataset) file, a list
    of them or a glob. Nothing is downloaded: Hub names and remote URLs are refused.
    split: the split of a ``DatasetDict`` (default: its only split). cache_dir: where
    ``load_dataset`` keeps its Arrow cache (default: the ``datasets`` cache).
    """
    import datasets

    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise NotImplementedError(STREAMING_UNSUPPORTED)
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        ds = source
    else:
        ds = load_path(source, split, cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        ds = pick_split(ds, split)
    return ds


def load_path(source, split: str | None, cache_dir: str | None):
    """``load_from_disk`` for a ``save_to_disk`` folder, else ``load_dataset`` of local files."""
    import datasets

    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths = [os.fspath(p).removeprefix("file://") for p in items]
    remote = [p for p in paths if "://" in p]
    if remote:
        raise ValueError(f"{remote[0]} is remote: --hf-dataset reads local files only; download the dataset first")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        if any(os.path.exists(os.path.join(folder, f)) for f in ("dataset_dict.json", "state.json")):
            return datasets.load_from_disk(folder)
        return datasets.load_dataset(folder, cache_dir=cache_dir)
    files = []
    for p in paths:
        matched = sorted(glob.glob(p), key=natural_key) if glob.has_magic(p) else [p]
        matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise FileNotFoundError(
                f"no dataset at {p!r}: give a save_to_disk folder, a folder of data files, or "
                f".parquet/.arrow/.tar files (globs allowed); Hub names are not downloaded"
            )
        files.extend(matched)
    kinds = sorted({Path(f).suffix for f in files})
    builders = {DATA_FILE_BUILDERS.get(k) for k in kinds}
    if None in builders or len(builders) != 1:
        raise ValueError(f"cannot read {kinds} files as one dataset: give only .parquet, .arrow or .tar files")
    return datasets.load_dataset(builders.pop(), data_files={split or "train": files}, cache_dir=cache_dir)


def natural_key(path: str):
    """Sort key comparing the numbers in a path as numbers (``part-2`` before ``part-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def pick_split(dataset_dict, split: str | None):
    names = list(dataset_dict)
    if split is None:
        if len(names) == 1:
            return dataset_dict[names[0]]
        raise ValueError(f"the dataset has splits {names}: choose one with --split")
    if split not in dataset_dict:
        raise ValueError(f"no split {split!r}: the dataset has {names}")
    return dataset_dict[split]


# --------------------------------------------------------------------------- column checks


def is_image_type(t: pa.DataType) -> bool:
    """Encoded image bytes: binary, or a struct with a binary ``bytes`` field (``datasets.Image``)."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        inner = t.field("bytes").type
        return pa.types.is_binary(inner) or pa.types.is_large_binary(inner)
    return False


def is_embedding_type(t: pa.DataType) -> bool:
    """A list (fixed-size, or variable with equal lengths) of floats per row."""
    lists = pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)
    return lists and pa.types.is_floating(t.value_type)


def is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_id_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


COLUMN_RULES = {
    # role: (type check, what it needs, CLI flag)
    "image": (is_image_type, "encoded image bytes (a datasets.Image() column or binary)", "--image-column"),
    "embedding": (is_embedding_type, "a list of floats per row (fixed-size list or list)", "--embedding-column"),
    "text": (is_text_type, "strings", "--text-column"),
    "id": (is_id_type, "strings or integers", "--id-column"),
}


# --------------------------------------------------------------------------- the input


@dataclass
class DatasetInput:
    """A local map-style dataset and the roles of its columns.

    Exactly one of ``image_column`` / ``embedding_column`` is set (an embedding column wins).
    ``dim``: the embedding width (embedding column only, from its first non-null row).
    """

    dataset: object
    label: str
    image_column: str | None = None
    embedding_column: str | None = None
    text_column: str | None = None
    id_column: str | None = None
    dim: int | None = None

    @classmethod
    def open(
        cls,
        source,
        *,
        split: str | None = None,
        image_column: str | None = "image",
        embedding_column: str | None = None,
        text_column: str | None = None,
        id_column: str | None = None,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> DatasetInput:
        """Load ``source`` (see :func:`load_local_dataset`) and check the named columns."""
        with hf_progress(progress):
            ds = load_local_dataset(source, split, cache_dir=cache_dir)
        label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"Dataset({ds.split or 'rows'})"
        inp = cls(
            ds,
            label,
            None if embedding_column else image_column,
            embedding_column,
            text_column,
            id_column,
        )
        inp.check_columns()
        if embedding_column:
            inp.dim = first_list_length(inp.arrow_view([embedding_column]), embedding_column)
        return inp

    @property
    def n_rows(self) -> int:
        return len(self.dataset)

    def roles(self) -> dict[str, str]:
        names = {
            "image": self.image_column,
            "embedding": self.embedding_column,
            "text": self.text_column,
            "id": self.id_column,
        }
        return {role: col for role, col in names.items() if col}

    def check_columns(self) -> None:
        roles = self.roles()
        if "image" not in roles and "embedding" not in roles:
            raise ValueError("give --image-column (embed images) or --embedding-column (precomputed embeddings)")
        schema = self.dataset.data.schema
        for role, col in roles.items():
            check, needs, flag = COLUMN_RULES[role]
            if col not in schema.names:
                raise PipelineError(f"{self.label} has no column {col!r} ({flag}); its columns: {schema.names}")
            if not check(schema.field(col).type):
                raise PipelineError(
                    f"column {col!r} of {self.label} is {schema.field(col).type}: {flag} needs {needs}"
                    + (
                        "; for a column of file paths use dataset.cast_column(col, datasets.Image())"
                        if role == "image"
                        else ""
                    )
                )

    def fingerprint(self) -> dict:
        """Identity of the rows: the dataset's own fingerprint, its Arrow files (path, size,
        mtime) and its length."""
        files = [f["filename"] for f in self.dataset.cache_files]
        return {"dataset": self.dataset._fingerprint, "files": file_fingerprint(files), "rows": self.n_rows}

    def arrow_view(self, columns: list[str]):
        """The dataset restricted to ``columns``, indexed as Arrow tables (``view[a:b]``)."""
        return self.dataset.select_columns(columns).with_format("arrow")

    def chunk_labels(self, chunk_rows: int) -> list[str]:
        """One label per resume unit: ``LABEL[a:b]`` for rows a..b-1."""
        return [f"{self.label}[{a}:{min(a + chunk_rows, self.n_rows)}]" for a in range(0, self.n_rows, chunk_rows)]


def first_list_length(view, column: str, batch_rows: int = 4096) -> int:
    """Length of the first non-null list in ``column`` (the embedding width)."""
    for lo in range(0, len(view), batch_rows):
        lengths = pc.drop_null(pc.list_value_length(view[lo : lo + batch_rows].column(column)))
        if len(lengths):
            return int(lengths[0].as_py())
    raise PipelineError(f"embedding column {column!r} has no non-null row")


def row_keys(table: pa.Table, id_column: str | None, start: int) -> list[str]:
    """Keys of the rows of ``table`` (rows ``start``... of the dataset): the id column as
    strings, or the row index."""
    if id_column is None:
        return [str(i) for i in range(start, start + table.num_rows)]
    ids = table.column(id_column)
    if ids.null_count:
        first = start + int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise PipelineError(f"id column {id_column!r} is null in row {first}: every row needs an id")
    return [str(v) for v in ids.to_pylist()]


def image_payload(value) -> bytes | None:
    """Encoded bytes of one image cell (``bytes``, or an Image struct with bytes or a local path)."""
    if value is None or isinstance(value, bytes):
        return value
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path")
    if path and os.path.isfile(path):
        with open(path, "rb") as fh:
            return fh.read()
    return None


def embedding_rows(column: pa.ChunkedArray | pa.Array, dim: int, *, name: str, start: int) -> np.ndarray:
    """(m, dim) rows of the non-null cells of a list-of-floats column; a view of the Arrow
    buffer (no copy) when the column is one chunk without nulls. Ragged lengths raise."""
    arr = column
    if isinstance(column, pa.ChunkedArray):
        arr = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    valid = ~arr.is_null().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(valid & (lengths != dim))
    if bad.size:
        raise PipelineError(
            f"ragged embedding lengths in column {name!r}: row {start + int(bad[0])} has "
            f"{int(lengths[bad[0]])} values, the first row has {dim}; every embedding needs the same length"
        )
    values = arr.flatten()
    flat = values.to_numpy(zero_copy_only=values.null_count == 0)
    return flat.reshape(int(valid.sum()), dim)


# --------------------------------------------------------------------------- embed


class DatasetEmbedStage(EmbedStage):
    """The embed stage over a dataset's rows: one chunk (resume unit) per ``chunk_rows`` rows.

    The artifact is the embed stage's (``chunks/{i}.img.npy`` + ``keys.parquet``), so the
    cluster and select stages run unchanged; ``keys.parquet`` holds ``key`` (id column or row
    index), ``index`` (row index), ``nbytes`` (encoded image bytes), ``status``; ``shard`` is
    the chunk's label ``LABEL[a:b]``. Executors embed the pending chunks as they embed shards.
    """

    def __init__(
        self,
        out,
        source: DatasetInput,
        encoder=None,
        *,
        batch_size: int = 64,
        text: bool = False,
        dtype: str = "float16",
        strict: bool = False,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        progress: bool = True,
        executor=None,
    ):
        if batch_size < 1 or chunk_rows < 1:
            raise ValueError(f"batch_size and chunk_rows must be >= 1, got {batch_size}, {chunk_rows}")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        if source.embedding_column:
            if text:
                raise PipelineError(
                    "CLIP score needs caption embeddings, which an embedding column does not give: "
                    "embed the image column with a CLIP model (--model) and --text-column"
                )
            encoder_fp = {"column": source.embedding_column}
        else:
            if text and not source.text_column:
                raise PipelineError("CLIP score needs captions: give --text-column")
            if encoder is None:
                raise ValueError("give an encoder/model to embed the image column, or --embedding-column")
            encoder_fp = encoder.fingerprint
        params = {
            "encoder": encoder_fp,
            "columns": source.roles(),
            "batch_size": batch_size,
            "chunk_rows": chunk_rows,
            "text": bool(text),
            "dtype": dtype,
            "strict": bool(strict),
        }
        Stage.__init__(self, out, params, {"dataset": source.fingerprint()})
        self.source = source
        self.shards = source.chunk_labels(chunk_rows)
        self.encoder, self.progress, self.executor = encoder, progress, executor

    def rows_of(self, i: int) -> tuple[int, int]:
        size = self.params["chunk_rows"]
        return i * size, min((i + 1) * size, self.source.n_rows)

    def embed_one(self, i: int, progress=None, on_sample=None) -> None:
        start, stop = self.rows_of(i)
        if self.source.embedding_column:
            table, images = read_embedding_chunk(self.source, start, stop, strict=self.params["strict"])
            texts = None
            for _ in range(stop - start):
                if progress is not None:
                    progress.update(1)
                if on_sample is not None:
                    on_sample()
        else:
            encoder = self.encoder_obj()
            if self.params["text"] and not getattr(encoder, "has_text", False):
                raise PipelineError("caption embeddings requested (CLIP score) but the encoder has no text tower")
            table, images, texts = embed_image_rows(
                self.source,
                start,
                stop,
                encoder,
                batch_size=self.params["batch_size"],
                text=self.params["text"],
                strict=self.params["strict"],
                progress=progress,
                on_sample=on_sample,
            )
        save_chunk(
            self.dir,
            i,
            table,
            images,
            texts,
            ShardScan(self.shards[i]),
            dim=self.source.dim,
            dtype=np.dtype(self.params["dtype"]),
            text=self.params["text"],
        )


def chunk_table(keys: list[str], start: int, nbytes, status) -> pd.DataFrame:
    """The per-chunk sample table (key, index, nbytes, status) the embed stage merges."""
    return pd.DataFrame(
        {
            "key": pd.Series(keys, dtype=object),
            "index": np.arange(start, start + len(keys), dtype=np.int64),
            "nbytes": np.asarray(nbytes, dtype=np.int64),
            "status": pd.Series(status, dtype=object),
        }
    )


def read_embedding_chunk(source: DatasetInput, start: int, stop: int, *, strict: bool):
    """Rows ``start..stop-1`` of the embedding column: (sample table, (m, d) rows of the
    non-null, finite embeddings). Null or non-finite embeddings get status ``no_embedding``."""
    col = source.embedding_column
    columns = [col] + ([source.id_column] if source.id_column else [])
    table = source.arrow_view(columns)[start:stop]
    keys = row_keys(table, source.id_column, start)
    rows = embedding_rows(table.column(col), source.dim, name=col, start=start)
    ok = ~table.column(col).is_null().to_numpy(zero_copy_only=False)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        ok[np.flatnonzero(ok)[~finite]] = False
        rows = rows[finite]
    if strict and not ok.all():
        bad = start + int(np.flatnonzero(~ok)[0])
        raise PipelineError(f"row {bad} of {source.label} has a null or non-finite embedding in column {col!r}")
    status = np.where(ok, STATUS_OK, NO_EMBEDDING)
    return chunk_table(keys, start, np.zeros(len(keys)), status), rows


def embed_image_rows(
    source: DatasetInput,
    start: int,
    stop: int,
    encoder,
    *,
    batch_size: int,
    text: bool,
    strict: bool,
    progress=None,
    on_sample=None,
):
    """Decode and embed rows ``start..stop-1``: (sample table, image rows (m, d) f32 or None,
    caption rows or None). Images are decoded with the tar path's ``decode_image`` and sent to
    the encoder in batches of ``batch_size`` decodable images (batches never cross chunks)."""
    img_col, txt_col = source.image_column, source.text_column if text else None
    columns = [img_col] + [c for c in (txt_col, source.id_column) if c and c != img_col]
    view = source.arrow_view(columns)
    keys, nbytes, status = [], [], []
    ready_imgs, ready_txts, img_rows, txt_rows = [], [], [], []

    def encode_ready():
        img_rows.append(np.asarray(encoder.encode_images(ready_imgs), dtype=np.float32))
        if text:
            txt_rows.append(np.asarray(encoder.encode_texts(ready_txts), dtype=np.float32))
        if progress is not None:
            progress.update(len(ready_imgs))
        ready_imgs.clear()
        ready_txts.clear()

    for lo in range(start, stop, batch_size):
        part = view[lo : min(lo + batch_size, stop)]
        part_keys = row_keys(part, source.id_column, lo)
        captions = part.column(txt_col).to_pylist() if txt_col else [""] * part.num_rows
        for j, cell in enumerate(part.column(img_col).to_pylist()):
            data = image_payload(cell)
            state = STATUS_OK if data is not None else MISSING_IMAGE
            if data is not None:
                try:
                    ready_imgs.append(decode_image(data))
                    ready_txts.append(captions[j] or "")
                except Exception as exc:  # PIL raises many types for bad data
                    state = UNDECODABLE
                    if strict:
                        raise PipelineError(f"undecodable image in row {lo + j} ({img_col!r}): {exc}") from exc
            elif strict:
                raise PipelineError(f"row {lo + j} of {source.label} has no image in column {img_col!r}")
            keys.append(part_keys[j])
            nbytes.append(len(data) if data is not None else 0)
            status.append(state)
            if len(ready_imgs) == batch_size:
                encode_ready()
            if on_sample is not None:
                on_sample()
    if ready_imgs:
        encode_ready()
    images = np.concatenate(img_rows) if img_rows else None
    texts = np.concatenate(txt_rows) if txt_rows else None
    return chunk_table(keys, start, nbytes, status), images, texts


# --------------------------------------------------------------------------- write


def output_shard_name(split: str, j: int, n: int) -> str:
    """``train-00000-of-00003.parquet``: the name ``load_dataset(folder)`` reads as split ``train``."""
    return f"{split}-{j:05d}-of-{n:05d}.parquet"


class DatasetWriteStage(Stage):
    """Kept rows -> ``OUT/write/dataset`` (``save_to_disk`` folder or parquet shards), the
    rows byte-identical to the input's and in input order, + ``manifest.json``.

    The dataset is built in ``dataset.incomplete`` and renamed when whole. Parquet shards are
    planned up front (``--shard-max-count`` rows / ``--shard-max-size`` image bytes) and each
    is published atomically, so a killed run keeps its finished shards (resume unit: one
    output shard); a ``save_to_disk`` folder is rebuilt whole.
    """

    name = "write"
    owned = ("manifest.json", "dataset/*", "dataset.incomplete/*")

    def __init__(
        self,
        out,
        select: SelectArtifact,
        source: DatasetInput,
        *,
        output_format: str = "disk",
        max_count: int = 10000,
        max_size: int = 3_000_000_000,
        progress: bool = True,
    ):
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        params = {"format": output_format, "max_count": int(max_count), "max_size": int(max_size)}
        super().__init__(out, params, {"select": select.fingerprint, "dataset": source.fingerprint()})
        self.select, self.source, self.progress = select, source, progress

    @property
    def final(self) -> Path:
        return self.dir / "dataset"

    def compute(self, log):
        keep = self.select.keep
        kept = keep[keep["kept"]].sort_values("index", kind="stable")
        rows = kept["index"].to_numpy(np.int64)
        plan = np.asarray(
            plan_output_shards(
                kept["nbytes"].to_numpy(), max_count=self.params["max_count"], max_size=self.params["max_size"]
            ),
            dtype=np.int64,
        )
        n_out = int(plan.max()) + 1 if plan.size else 1
        staging = self.dir / "dataset.incomplete"
        if not self.final.exists():
            if self.params["format"] == "disk":
                if staging.exists():
                    shutil.rmtree(staging)
                with hf_progress(self.progress):
                    self.source.dataset.select(rows).save_to_disk(str(staging), num_shards=n_out)
            else:
                self.write_parquet(staging, rows, plan, n_out)
            os.replace(staging, self.final)
        files = sorted(p for p in self.final.rglob("*") if p.is_file())
        manifest = {
            "format": self.params["format"],
            "dir": self.final.name,
            "samples": int(rows.size),
            "files": [
                {"file": str(p.relative_to(self.final)), "bytes": p.stat().st_size, "sha256": file_digest(p)}
                for p in files
            ],
        }
        manifest["bytes"] = int(sum(f["bytes"] for f in manifest["files"]))
        atomic_write_json(self.dir / "manifest.json", manifest)
        return {"output_shards": n_out, "samples": int(rows.size), "bytes": manifest["bytes"]}

    def write_parquet(self, staging: Path, rows: np.ndarray, plan: np.ndarray, n_out: int) -> None:
        """Parquet shard j holds ``rows[plan == j]``; finished shards of a killed run are kept."""
        staging.mkdir(exist_ok=True)
        view = self.source.dataset.with_format("arrow")
        schema = self.source.dataset.data.schema
        split = str(self.source.dataset.split or "train")
        written = 0
        with tqdm(total=int(rows.size), desc="write", unit="row", disable=not self.progress) as bar:
            for j in range(n_out):
                path = staging / output_shard_name(split, j, n_out)
                part = rows[plan == j]
                if path.exists():
                    bar.update(part.size)
                    continue
                with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
                    if part.size == 0:
                        writer.write_table(view[:0])
                    for lo in range(0, part.size, WRITE_BATCH_ROWS):
                        batch = part[lo : lo + WRITE_BATCH_ROWS]
                        writer.write_table(view[batch.tolist()])
                        written += batch.size
                        bar.update(batch.size)
                        die_hook("write", written)

    def load(self) -> dict:
        """The manifest, with ``path``: the filtered dataset's folder."""
        manifest = json.loads((self.dir / "manifest.json").read_text())
        manifest["path"] = str(self.dir / manifest["dir"])
        return manifest


__all__ = [
    "DatasetEmbedStage",
    "DatasetInput",
    "DatasetWriteStage",
    "STREAMING_UNSUPPORTED",
    "load_local_dataset",
]
