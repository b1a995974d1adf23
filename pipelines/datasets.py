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

Streaming inputs (an ``IterableDataset``, or ``--streaming`` to read local files without
``load_dataset``'s Arrow cache) go through the same stages in one sequential pass per stage:
memory is bounded by one batch of rows plus one chunk's embeddings and keys; a killed run
keeps its finished chunks / output shards and re-reads the stream from the start to reach
the first unfinished one (the keys of the finished chunks are compared on the way, so a
changed stream is detected). Streaming output is parquet shards.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipelines.shards.decode import DecodeOptions, decode_options_of
from pipelines.shards.embed import (
    EmbeddedBatch,
    EmbedStage,
    EmbedTiming,
    check_embed_options,
    chunk_paths,
    embed_stream,
    encode_in_slots,
    finalize_embed,
    save_chunk,
)
from pipelines.shards.select import SelectArtifact
from pipelines.shards.stage import (
    NO_EMBEDDING,
    STATUS_OK,
    PipelineError,
    Stage,
    die_hook,
    folder_files,
    is_temporary,
    owns,
)
from pipelines.shards.tario import ShardScan, file_fingerprint, plan_output_shards
from pipelines.shards.threads import resolve_threads
from prunecore.io import atomic_path, atomic_write_json, file_digest

DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
OUTPUT_FORMATS = ("disk", "parquet")
DEFAULT_CHUNK_ROWS = 10_000
WRITE_BATCH_ROWS = 1_000
STREAM_BATCH_ROWS = 1_000


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


def load_local_dataset(source, split: str | None = None, *, cache_dir: str | None = None, streaming: bool = False):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when streaming) from ``source``.

    source: a ``Dataset`` / ``DatasetDict`` / ``IterableDataset`` / ``IterableDatasetDict``; a
    ``save_to_disk`` folder; a folder of data files (``load_dataset(folder)``); a ``.parquet`` /
    ``.arrow`` / ``.tar`` (webdataset) file, a list of them or a glob. Nothing is downloaded:
    Hub names and remote URLs are refused. split: the split of a dataset dict (default: its
    only split). cache_dir: ``load_dataset``'s Arrow cache (default: the ``datasets`` cache).
    streaming: read the files as a stream (no Arrow cache); a map-style input is turned into
    an ``IterableDataset`` (an ``IterableDataset`` input always streams).
    """
    import datasets

    if isinstance(source, (str, os.PathLike, list, tuple)):
        ds = load_path(source, split, cache_dir, streaming)
    else:
        ds = source
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = pick_split(ds, split)
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"hf_dataset must be a path or a datasets Dataset / IterableDataset, got {type(ds).__name__}")
    return ds


def load_path(source, split: str | None, cache_dir: str | None, streaming: bool = False):
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
        return datasets.load_dataset(folder, cache_dir=cache_dir, streaming=streaming)
    files = data_files(paths)
    kinds = sorted({Path(f).suffix for f in files})
    builders = {DATA_FILE_BUILDERS.get(k) for k in kinds}
    if None in builders or len(builders) != 1:
        raise ValueError(f"cannot read {kinds} files as one dataset: give only .parquet, .arrow or .tar files")
    builder = builders.pop()
    options = stream_options(builder) if streaming else {}
    return datasets.load_dataset(
        builder, data_files={split or "train": files}, cache_dir=cache_dir, streaming=streaming, **options
    )


def stream_options(builder: str) -> dict:
    """``load_dataset`` options that keep a stream's memory bounded: parquet is read in
    batches of :data:`STREAM_BATCH_ROWS` rows without pre-buffering (pyarrow's default
    pre-buffering keeps every row group read so far in memory)."""
    if builder != "parquet":
        return {}
    import pyarrow.dataset as pds

    return {"fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False), "batch_size": STREAM_BATCH_ROWS}


def data_files(paths: list[str]) -> list[str]:
    """The files named by ``paths`` (globs expanded, numbers sorted as numbers)."""
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
    return files


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
    """A local dataset (map-style, or a stream) and the roles of its columns.

    Exactly one of ``image_column`` / ``embedding_column`` is set (an embedding column wins).
    ``dim``: the embedding width (embedding column only, from its first non-null row).
    ``files``: the data files it was opened from (identity of a stream).
    """

    dataset: object
    label: str
    image_column: str | None = None
    embedding_column: str | None = None
    text_column: str | None = None
    id_column: str | None = None
    dim: int | None = None
    files: list[str] = field(default_factory=list)

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
        streaming: bool = False,
        progress: bool = True,
    ) -> DatasetInput:
        """Load ``source`` (see :func:`load_local_dataset`) and check the named columns."""
        with hf_progress(progress):
            ds = load_local_dataset(source, split, cache_dir=cache_dir, streaming=streaming)
        is_path = isinstance(source, (str, os.PathLike))
        label = os.fspath(source) if is_path else f"Dataset({ds.split or 'rows'})"
        roles = (None if embedding_column else image_column, embedding_column, text_column, id_column)
        inp = cls(ds, label, *roles)
        if inp.streaming and is_path:  # a stream's identity: the files it reads
            folder = Path(source)
            inp.files = sorted(map(str, folder.rglob("*"))) if folder.is_dir() else data_files([label])
        inp.check_columns()
        if embedding_column:
            inp.dim = first_list_length(inp.iter_tables([embedding_column], 4096), embedding_column)
        return inp

    @property
    def streaming(self) -> bool:
        return not hasattr(self.dataset, "cache_files")  # an IterableDataset

    @property
    def n_rows(self) -> int | None:
        """Row count (None for a stream: unknown until read)."""
        return None if self.streaming else len(self.dataset)

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the rows (with the ``datasets`` features in its metadata)."""
        if not self.streaming:
            return self.dataset.data.schema
        if self.dataset.features is None:
            raise PipelineError(
                f"{self.label}: the stream does not declare its features (column types); "
                "give them: dataset.cast(features) or load_dataset(..., features=...)"
            )
        return self.dataset.features.arrow_schema

    @property
    def split_name(self) -> str:
        return str(self.dataset.split or "train")

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
        schema = self.schema
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
        """Identity of the rows. Map-style: the dataset's own fingerprint, its Arrow files
        (path, size, mtime) and its length. Stream: its data files (when opened from a path),
        features and shard count (a resumed stream also re-checks the finished chunks' keys)."""
        if self.streaming:
            return {
                "stream": self.label,
                "files": file_fingerprint(self.files),
                "features": str(self.dataset.features),
                "n_shards": self.dataset.n_shards,
            }
        files = [f["filename"] for f in self.dataset.cache_files]
        return {"dataset": self.dataset._fingerprint, "files": file_fingerprint(files), "rows": self.n_rows}

    def embed_columns(self, text: bool) -> list[str]:
        """The columns the embed stage reads (each once)."""
        wanted = (self.embedding_column or self.image_column, self.text_column if text else None, self.id_column)
        return list(dict.fromkeys(c for c in wanted if c))

    def arrow_view(self, columns: list[str]):
        """Map-style only: the dataset restricted to ``columns``, indexed as Arrow tables (``view[a:b]``)."""
        return self.dataset.select_columns(columns).with_format("arrow")

    def iter_tables(
        self, columns: list[str], batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, pa.Table]]:
        """(first row index, Arrow table of up to ``batch_size`` consecutive rows) for rows
        ``start..stop-1`` (a stream: every row, from the first). Cells are never decoded: a
        stream is read with ``decode(False)`` (media stay bytes) and encoded back to Arrow."""
        if not self.streaming:
            view = self.arrow_view(columns)
            stop = len(view) if stop is None else stop
            for lo in range(start, stop, batch_size):
                yield lo, view[lo : min(lo + batch_size, stop)]
            return
        if start or stop is not None:
            raise ValueError("a stream is read from its first row to its end")
        stream = self.dataset.select_columns(columns).decode(False)  # media cells stay bytes
        raw = stream.features
        full = self.schema
        schema = full if columns == full.names else pa.schema([full.field(c) for c in columns])
        row = 0
        for batch in stream.iter(batch_size=batch_size):
            table = pa.Table.from_pydict(raw.encode_batch(batch), schema=schema)
            yield row, table
            row += table.num_rows

    def chunk_labels(self, chunk_rows: int, n_rows: int) -> list[str]:
        """One label per resume unit: ``LABEL[a:b]`` for rows a..b-1."""
        return [f"{self.label}[{a}:{min(a + chunk_rows, n_rows)}]" for a in range(0, n_rows, chunk_rows)]


def first_list_length(tables: Iterator[tuple[int, pa.Table]], column: str) -> int:
    """Length of the first non-null list in ``column`` of ``tables`` (the embedding width)."""
    for _, table in tables:
        lengths = pc.drop_null(pc.list_value_length(table.column(column)))
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
    the chunk's label ``LABEL[a:b]``. Map-style: executors embed the pending chunks as they
    embed shards. Stream: one pass in this process (:meth:`embed_stream`).
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
        decode: DecodeOptions | None = None,
        progress: bool = True,
        executor=None,
        threads: int | None = None,
    ):
        check_embed_options(batch_size, dtype, threads)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
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
        self.decode = decode or DecodeOptions()
        if not source.embedding_column:
            params["decode"] = self.decode.fingerprint()
            params["threads"] = resolve_threads(threads)  # as the tar path's (EmbedStage)
        Stage.__init__(self, out, params, {"dataset": source.fingerprint()})
        self.source = source
        self.shards = [] if source.streaming else source.chunk_labels(chunk_rows, source.n_rows)
        self.encoder, self.progress, self.executor = encoder, progress, executor

    def compute(self, log):
        if not self.source.streaming:
            return super().compute(log)
        self.embed_stream()
        return finalize_embed(self.dir, self.shards, text=self.params["text"])

    def chunk_embedder(self, decoder, progress=None, on_sample=None, timing=None) -> ChunkEmbedder:
        encoder = None if self.source.embedding_column else self.image_encoder()
        return ChunkEmbedder(
            self.source,
            encoder,
            decoder,
            batch_size=self.params["batch_size"],
            text=self.params["text"],
            strict=self.params["strict"],
            progress=progress,
            on_sample=on_sample,
            timing=timing,
        )

    def make_decoder(self, workers: int | None = None, start_method: str | None = None):
        """The image decoder (worker processes); an embedding column decodes nothing (no workers)."""
        return super().make_decoder(0 if self.source.embedding_column else workers, start_method)

    def save(self, i: int, embedder: ChunkEmbedder) -> None:
        self.claim(self.chunk_files(i))  # a stream's chunks are known as they come (map-style: claimed up front)
        table, images, texts = embedder.finish()
        save_chunk(
            self.dir,
            i,
            table,
            images,
            texts,
            ShardScan(f"{self.source.label}[chunk {i}]"),
            dim=self.source.dim,
            dtype=np.dtype(self.params["dtype"]),
            text=self.params["text"],
        )

    def embed_many(self, todo: Sequence[int], decoder, progress=None, on_sample=None, timing=None) -> None:
        """Embed chunks ``todo`` of a map-style dataset (chunk ``i``: rows ``i * chunk_rows ...``)
        with ``decoder`` (the executors' :meth:`make_decoder`), saving each when complete."""
        size = self.params["chunk_rows"]
        columns = self.source.embed_columns(self.params["text"])
        for i in todo:
            start, stop = i * size, min((i + 1) * size, self.source.n_rows)
            embedder = self.chunk_embedder(decoder, progress, on_sample, timing)
            embedder.run(self.source.iter_tables(columns, self.params["batch_size"], start, stop))
            self.save(i, embedder)

    def embed_stream(self) -> None:
        """One pass over a stream: rows are cut into chunks of ``chunk_rows``; chunks finished
        by a killed run are not embedded again (their keys are compared with the stream's)."""
        size = self.params["chunk_rows"]
        columns = self.source.embed_columns(self.params["text"])
        rows_seen = [0]

        def tables():
            for lo, part in self.source.iter_tables(columns, self.params["batch_size"]):
                rows_seen[0] = lo + part.num_rows
                yield lo, part

        with self.local_run() as (decoder, hooks):
            for i, group in itertools.groupby(split_at_chunks(tables(), size), key=lambda item: item[0]):
                parts = ((row, part) for _, row, part in group)
                finished = chunk_paths(self.dir, i)["keys"]
                if finished.exists():
                    FinishedChunk(finished, self.source.id_column).verify(parts)
                    continue
                embedder = self.chunk_embedder(decoder, **hooks)
                embedder.run(parts)
                self.save(i, embedder)
        self.shards = self.source.chunk_labels(size, rows_seen[0])


def split_at_chunks(tables: Iterable[tuple[int, pa.Table]], size: int) -> Iterator[tuple[int, int, pa.Table]]:
    """(chunk index, first row, Arrow slice) for consecutive tables cut at multiples of ``size`` rows."""
    for lo, part in tables:
        pos = 0
        while pos < part.num_rows:
            row = lo + pos
            i = row // size
            take = min(part.num_rows - pos, (i + 1) * size - row)
            yield i, row, part.slice(pos, take)
            pos += take


class ChunkEmbedder:
    """Embeds one chunk's rows, given in order as Arrow tables: :meth:`run`, then :meth:`finish`.

    Image column: cells go through the tar path's :func:`~pipelines.shards.embed.embed_stream`
    with the stage's decoder (parallel decode workers, JPEG draft, pixel cap), in encoder
    batches fixed by row index (row ``r`` in slot ``r % batch_size``), as the tar path's are
    by a sample's index in its shard: a chunk boundary or a stream changes no row. Embedding
    column: the rows are taken from the Arrow buffers (:func:`embedding_rows`); null or
    non-finite ones get ``no_embedding``.
    """

    def __init__(
        self,
        source: DatasetInput,
        encoder,
        decoder,
        *,
        batch_size: int,
        text: bool,
        strict: bool,
        progress=None,
        on_sample=None,
        timing: EmbedTiming | None = None,
    ):
        self.source, self.encoder, self.decoder = source, encoder, decoder
        self.batch_size, self.text, self.strict = batch_size, text, strict
        self.progress, self.on_sample, self.timing = progress, on_sample, timing
        self.start: int | None = None
        self.keys: list[str] = []
        self.nbytes: list[int] = []
        self.status: list[str] = []
        self.captions: list[str] = []
        self.img_rows, self.txt_rows = [], []

    def run(self, parts: Iterable[tuple[int, pa.Table]]) -> None:
        """Embed the chunk's rows: ``(first row index, Arrow table)`` parts in order."""
        if self.source.embedding_column:
            for start, part in parts:
                self.start = start if self.start is None else self.start
                self.keys.extend(row_keys(part, self.source.id_column, start))
                self.feed_embeddings(part, start)
            return
        parts = iter(parts)
        first = next(parts, None)
        if first is None:
            return
        stream = embed_stream(
            self.image_items(itertools.chain([first], parts)),
            self.encoder,
            self.decoder,
            batch_size=self.batch_size,
            timing=self.timing,
            first_position=first[0],  # batches fixed by row index, as the tar path's by sample index
        )
        for batch in stream:
            self.add_batch(batch)

    def image_items(self, parts: Iterable[tuple[int, pa.Table]]) -> Iterator[tuple[str, bytes | None]]:
        """``(key, encoded image or None)`` per row; records keys, sizes and captions on the way."""
        img_col = self.source.image_column
        for start, part in parts:
            self.start = start if self.start is None else self.start
            keys = row_keys(part, self.source.id_column, start)
            captions = part.column(self.source.text_column).to_pylist() if self.text else [""] * part.num_rows
            for j, cell in enumerate(part.column(img_col).to_pylist()):
                data = image_payload(cell)
                if data is None and self.strict:
                    raise PipelineError(f"row {start + j} of {self.source.label} has no image in column {img_col!r}")
                self.keys.append(keys[j])
                self.nbytes.append(len(data) if data is not None else 0)
                self.captions.append(captions[j] or "")
                yield keys[j], data
                if self.on_sample is not None:
                    self.on_sample()

    def add_batch(self, batch: EmbeddedBatch) -> None:
        """Record one decoded + encoded run of rows (and embed its captions)."""
        first = len(self.status)
        self.status.extend(batch.status)
        if self.strict:
            for j, (state, err) in enumerate(zip(batch.status, batch.errors)):
                if state != STATUS_OK:
                    raise PipelineError(
                        f"{state} image in row {self.start + first + j} ({self.source.image_column!r}): {err}"
                    )
        if batch.embeddings is None:
            return
        self.img_rows.append(batch.embeddings)
        if self.text:
            ok = [self.captions[first + j] for j, state in enumerate(batch.status) if state == STATUS_OK]
            self.txt_rows.append(encode_in_slots(self.encoder.encode_texts, ok, batch.slots, self.batch_size))
        if self.progress is not None:
            self.progress.update(len(batch.embeddings))

    def feed_embeddings(self, part: pa.Table, start: int) -> None:
        col = self.source.embedding_column
        rows = embedding_rows(part.column(col), self.source.dim, name=col, start=start)
        ok = ~part.column(col).is_null().to_numpy(zero_copy_only=False)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            ok[np.flatnonzero(ok)[~finite]] = False
            rows = rows[finite]
        if self.strict and not ok.all():
            bad = start + int(np.flatnonzero(~ok)[0])
            raise PipelineError(f"row {bad} of {self.source.label} has a null or non-finite embedding in {col!r}")
        self.img_rows.append(rows)
        self.status.extend(np.where(ok, STATUS_OK, NO_EMBEDDING).tolist())
        self.nbytes.extend([0] * part.num_rows)
        for _ in range(part.num_rows):
            if self.progress is not None:
                self.progress.update(1)
            if self.on_sample is not None:
                self.on_sample()

    def finish(self) -> tuple[pd.DataFrame, np.ndarray | None, np.ndarray | None]:
        """(sample table: key, index, nbytes, status; image rows (m, d) or None; caption rows or None)."""
        table = pd.DataFrame(
            {
                "key": pd.Series(self.keys, dtype=object),
                "index": np.arange(self.start or 0, (self.start or 0) + len(self.keys), dtype=np.int64),
                "nbytes": np.asarray(self.nbytes, dtype=np.int64),
                "status": pd.Series(self.status, dtype=object),
            }
        )
        images = np.concatenate(self.img_rows) if self.img_rows else None
        texts = np.concatenate(self.txt_rows) if self.txt_rows else None
        return table, images, texts


class FinishedChunk:
    """A chunk a killed run finished: its rows are read past, and :meth:`verify` checks their
    keys are the ones it recorded (else the stream changed, and the finished chunks are stale)."""

    def __init__(self, keys_path: Path, id_column: str | None):
        self.path, self.id_column = keys_path, id_column

    def verify(self, parts: Iterable[tuple[int, pa.Table]]) -> None:
        """Read past the chunk's rows (``(first row, Arrow table)`` parts), comparing their keys."""
        keys = [key for start, part in parts for key in row_keys(part, self.id_column, start)]
        recorded = pd.read_parquet(self.path, columns=["key"])["key"].tolist()
        if recorded != keys:
            raise PipelineError(
                f"the stream changed since the interrupted run: {self.path.name} recorded {len(recorded)} "
                f"rows, the stream now gives {len(keys)} with other keys; use a new --out"
            )


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
    output shard; a changed or missing shard of a finished dataset is rewritten in place); a
    ``save_to_disk`` folder is one unit, rebuilt whole when any of its files changed. Before
    the stage is recorded done the dataset is read back (:meth:`inconsistent`): every planned
    shard there with its planned rows, the folder loading with as many rows as were kept.
    ``output_format`` None: ``"disk"`` for a map-style dataset, ``"parquet"`` for a stream
    (the only one it can write).
    """

    name = "write"
    owned = ("manifest.json", "dataset/*", "dataset.incomplete/*")

    def __init__(
        self,
        out,
        select: SelectArtifact,
        source: DatasetInput,
        *,
        output_format: str | None = None,
        max_count: int = 10000,
        max_size: int = 3_000_000_000,
        progress: bool = True,
    ):
        output_format = output_format or ("parquet" if source.streaming else "disk")
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        if output_format == "disk" and source.streaming:
            raise ValueError("a streaming input is written as parquet shards: use --hf-output-format parquet")
        params = {"format": output_format, "max_count": int(max_count), "max_size": int(max_size)}
        super().__init__(out, params, {"select": select.fingerprint, "dataset": source.fingerprint()})
        self.select, self.source, self.progress = select, source, progress
        self.manifest: dict = {}

    @property
    def final(self) -> Path:
        return self.dir / "dataset"

    @property
    def staging(self) -> Path:
        return self.dir / "dataset.incomplete"

    def planned_rows(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(kept row indices in input order, output shard of each, number of output shards)."""
        keep = self.select.keep
        kept = keep[keep["kept"]].sort_values("index", kind="stable")
        rows = kept["index"].to_numpy(np.int64)
        plan = np.asarray(
            plan_output_shards(
                kept["nbytes"].to_numpy(), max_count=self.params["max_count"], max_size=self.params["max_size"]
            ),
            dtype=np.int64,
        )
        return rows, plan, int(plan.max()) + 1 if plan.size else 1

    def shard_names(self, n_out: int) -> list[str]:
        """The parquet output's file names (inside ``dataset/``)."""
        return [output_shard_name(self.source.split_name, j, n_out) for j in range(n_out)]

    def compute(self, log):
        rows, plan, n_out = self.planned_rows()
        if self.params["format"] == "disk":
            if not self.final.exists():
                folders = {f"{self.staging.name}/", f"{self.final.name}/"}
                self.claim(folders)  # save_to_disk names its files: the folders are claimed while it runs
                if self.staging.exists():
                    shutil.rmtree(self.staging)
                with hf_progress(self.progress):
                    self.source.dataset.select(rows).save_to_disk(str(self.staging), num_shards=n_out)
                self.names -= folders  # then exactly the files it wrote
                self.claim(
                    f"{d}/{rel}" for rel in folder_files(self.staging) for d in (self.staging.name, self.final.name)
                )
                os.replace(self.staging, self.final)
        else:
            names = self.shard_names(n_out)
            self.claim(f"{folder.name}/{name}" for folder in (self.staging, self.final) for name in names)
            # a finished dataset missing a shard (repair) gets it back in place; else build, then publish
            target = self.final if self.final.exists() else self.staging
            self.write_parquet(target, rows, plan, n_out)
            if target == self.staging:
                os.replace(self.staging, self.final)
        files = sorted(rel for rel in folder_files(self.final) if not is_temporary(rel.rsplit("/", 1)[-1]))
        manifest = {
            "format": self.params["format"],
            "dir": self.final.name,
            "samples": int(rows.size),
            "files": [
                {"file": rel, "bytes": (self.final / rel).stat().st_size, "sha256": file_digest(self.final / rel)}
                for rel in files
            ],
        }
        manifest["bytes"] = int(sum(f["bytes"] for f in manifest["files"]))
        atomic_write_json(self.dir / "manifest.json", manifest)
        self.manifest = manifest
        return {"output_shards": n_out, "samples": int(rows.size), "bytes": manifest["bytes"]}

    def known_digests(self) -> dict[str, str]:
        """The sha256 the manifest took of the dataset's files in this run."""
        return {f"{self.final.name}/{f['file']}": f["sha256"] for f in self.manifest.get("files", [])}

    def inconsistent(self, files: dict) -> dict[str, str]:
        """Dataset files that do not add up to the kept rows: a planned parquet shard missing,
        unreadable or with other than its planned rows; a ``save_to_disk`` folder that does not
        load or loads with another row count (the whole folder is one unit)."""
        rows, plan, n_out = self.planned_rows()
        if self.params["format"] == "disk":
            return self.disk_problems(files, rows.size)
        counts = np.bincount(plan, minlength=n_out) if rows.size else np.zeros(1, np.int64)
        bad = {}
        for name, want in zip(self.shard_names(n_out), counts.tolist()):
            rel = f"{self.final.name}/{name}"
            try:
                got = pq.read_metadata(self.dir / rel).num_rows if rel in files else None
            except (OSError, pa.ArrowException) as exc:
                bad[rel] = f"unreadable parquet ({exc})"
                continue
            if got != want:
                bad[rel] = "missing" if got is None else f"{got} rows, {want} planned"
        return bad

    def disk_problems(self, files: dict, n_rows: int) -> dict[str, str]:
        """:meth:`inconsistent` for a ``save_to_disk`` folder: every file of it when it does
        not load with ``n_rows`` rows."""
        import datasets

        try:
            with hf_progress(False):
                got = len(datasets.load_from_disk(str(self.final), keep_in_memory=False))
            problem = "" if got == n_rows else f"loads {got} rows, {n_rows} kept"
        except Exception as exc:  # noqa: BLE001 - any failure to load means rebuild
            problem = f"does not load ({type(exc).__name__}: {exc})".splitlines()[0]
        if not problem:
            return {}
        prefix = self.final.name + "/"
        return {rel: problem for rel in files if rel.startswith(prefix)} or {prefix: problem}

    def invalidate(self, rels: list[str]) -> list[str]:
        """Delete the changed files ``rels``; a ``save_to_disk`` folder goes whole (one unit)."""
        prefix = self.final.name + "/"
        if self.params["format"] == "disk" and any(rel.startswith(prefix) for rel in rels):
            rels = [*rels, *(prefix + rel for rel in folder_files(self.final))]
        deleted = []
        for rel in dict.fromkeys(rels):
            path = self.dir / rel
            if owns(rel, self.names) and path.is_file():
                path.unlink()
                deleted.append(rel)
        if self.params["format"] == "disk" and self.final.is_dir() and not folder_files(self.final):
            shutil.rmtree(self.final)  # only empty folders left: compute builds it again
        return deleted

    def write_parquet(self, staging: Path, rows: np.ndarray, plan: np.ndarray, n_out: int) -> None:
        """Parquet shard j holds ``rows[plan == j]``; finished shards of a killed run are kept."""
        staging.mkdir(exist_ok=True)
        paths = [staging / output_shard_name(self.source.split_name, j, n_out) for j in range(n_out)]
        todo = np.array([not p.exists() for p in paths])
        schema = self.source.schema
        if rows.size == 0:
            with atomic_path(paths[0]) as tmp:
                pq.write_table(schema.empty_table(), tmp)
            return
        written, shard, stack = 0, -1, contextlib.ExitStack()
        with tqdm(total=int(todo[plan].sum()), desc="write", unit="row", disable=not self.progress) as bar:
            for j, table in self.kept_tables(rows, plan, todo):
                if j != shard:  # output shards come in order: publish the previous one
                    stack.close()
                    stack = contextlib.ExitStack()
                    writer = stack.enter_context(pq.ParquetWriter(stack.enter_context(atomic_path(paths[j])), schema))
                    shard = j
                writer.write_table(table)
                written += table.num_rows
                bar.update(table.num_rows)
                die_hook("write", written)
            stack.close()

    def kept_tables(self, rows: np.ndarray, plan: np.ndarray, todo: np.ndarray) -> Iterator[tuple[int, pa.Table]]:
        """(output shard, Arrow table of its next kept rows) for the shards in ``todo``, in order.
        Map-style: the rows are taken by index; a stream is read once, from the start."""
        wanted = todo[plan]
        if not wanted.any():
            return
        if not self.source.streaming:
            view = self.source.dataset.with_format("arrow")
            for j in np.flatnonzero(todo):
                part = rows[plan == j]
                for lo in range(0, part.size, WRITE_BATCH_ROWS):
                    yield int(j), view[part[lo : lo + WRITE_BATCH_ROWS].tolist()]
            return
        last = int(rows[wanted].max())
        for lo, table in self.source.iter_tables(self.source.schema.names, WRITE_BATCH_ROWS):
            index = np.arange(lo, lo + table.num_rows)
            pos = np.minimum(np.searchsorted(rows, index), rows.size - 1)
            hit = (rows[pos] == index) & wanted[pos]
            shards = plan[pos[hit]]
            local = np.flatnonzero(hit)
            for j in np.unique(shards):
                yield int(j), table.take(local[shards == j])
            if lo + table.num_rows > last:
                return

    def load(self) -> dict:
        """The manifest, with ``path``: the filtered dataset's folder."""
        manifest = json.loads((self.dir / "manifest.json").read_text())
        manifest["path"] = str(self.dir / manifest["dir"])
        return manifest


# --------------------------------------------------------------------------- the report's images


def recorded_image_cells(dataset_record: dict, column: str, rows: Sequence[int]) -> dict[int, bytes | None]:
    """Encoded images of ``rows`` (row indices) in ``column`` of the dataset a run read.

    dataset_record: :meth:`DatasetInput.fingerprint` as the embed stage recorded it. A
    map-style dataset is reopened from its Arrow files (memory-mapped; only the asked rows'
    cells are read); a stream is read again from its path up to the last asked row, one batch
    at a time. Raises :class:`PipelineError` when the dataset was moved, changed or passed as
    an in-memory object (nothing to reopen).
    """
    wanted = sorted({int(r) for r in rows})
    if not wanted:
        return {}
    if "stream" in dataset_record:
        return stream_image_cells(dataset_record, column, wanted)
    recorded = dataset_record.get("files") or []
    if not recorded:
        raise PipelineError("the run read an in-memory dataset (no files): its images cannot be reopened")
    import datasets

    check_recorded_files(recorded)
    with hf_progress(False):
        parts = [datasets.Dataset.from_file(path) for path, _, _ in recorded]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) != dataset_record.get("rows", len(ds)):
        raise PipelineError(f"the dataset's files hold {len(ds)} rows, the run read {dataset_record['rows']}")
    if column not in ds.column_names:
        raise PipelineError(f"the dataset has no column {column!r} any more; its columns: {ds.column_names}")
    cells = ds.select_columns([column]).with_format("arrow")[wanted].column(column).to_pylist()
    return {row: image_payload(cell) for row, cell in zip(wanted, cells)}


def check_recorded_files(recorded: list) -> None:
    """Raise :class:`PipelineError` unless every ``(path, size, mtime_ns)`` file is still there, unchanged."""
    for path, size, mtime in recorded:
        if not os.path.exists(path):
            raise PipelineError(f"{path} is gone (moved or deleted since the run)")
        if file_fingerprint([path])[0] != [path, size, mtime]:
            raise PipelineError(f"{path} changed since the run")


def stream_image_cells(dataset_record: dict, column: str, wanted: list[int]) -> dict[int, bytes | None]:
    """:func:`recorded_image_cells` for a stream: one pass from the first row to ``wanted[-1]``."""
    check_recorded_files(dataset_record.get("files") or [])
    source = DatasetInput.open(dataset_record["stream"], image_column=column, streaming=True, progress=False)
    found: dict[int, bytes | None] = {}
    want = np.asarray(wanted, dtype=np.int64)
    for lo, table in source.iter_tables([column], STREAM_BATCH_ROWS):
        hit = want[(want >= lo) & (want < lo + table.num_rows)]
        if hit.size:
            cells = table.take(pa.array(hit - lo)).column(column).to_pylist()
            found.update(zip(hit.tolist(), map(image_payload, cells)))
        if lo + table.num_rows > wanted[-1]:
            break
    return found


# --------------------------------------------------------------------------- run_filter's stages


def dataset_embed_stage(out, cfg, encoder, *, text: bool, executor=None) -> tuple[DatasetInput, DatasetEmbedStage]:
    """The input and embed stage of ``run_filter`` for ``cfg.hf_dataset`` (``cfg``: a FilterConfig)."""
    source = DatasetInput.open(
        cfg.hf_dataset,
        split=cfg.split,
        image_column=cfg.image_column,
        embedding_column=cfg.embedding_column,
        text_column=cfg.text_column,
        id_column=cfg.id_column,
        cache_dir=cfg.hf_cache_dir,
        streaming=cfg.streaming,
        progress=cfg.progress,
    )
    stage = DatasetEmbedStage(
        out,
        source,
        encoder,
        batch_size=cfg.batch_size,
        text=text,
        dtype=cfg.dtype,
        strict=cfg.strict,
        chunk_rows=cfg.chunk_rows,
        decode=decode_options_of(cfg),
        progress=cfg.progress,
        executor=executor,
        threads=cfg.threads,
    )
    return source, stage


def dataset_write_stage(out, select: SelectArtifact, source: DatasetInput, cfg) -> DatasetWriteStage:
    """The write stage of ``run_filter`` for a dataset input (``cfg``: a FilterConfig)."""
    return DatasetWriteStage(
        out,
        select,
        source,
        output_format=cfg.hf_output_format,
        max_count=cfg.shard_max_count,
        max_size=cfg.shard_max_size,
        progress=cfg.progress,
    )


__all__ = [
    "ChunkEmbedder",
    "DatasetEmbedStage",
    "DatasetInput",
    "DatasetWriteStage",
    "dataset_embed_stage",
    "dataset_write_stage",
    "load_local_dataset",
    "recorded_image_cells",
]
