"""The rows of a local Hugging Face dataset and the roles of its columns.

:class:`DatasetInput` is a dataset (map-style, or a stream) with its image / embedding /
text / id columns checked; it reads rows as Arrow tables (cells never decoded) and reopens a
finished run's images for the report (:func:`recorded_image_cells`). How its rows are cut
into resume units and embedded: :mod:`pipelines.shards.inputs.dataset_embed`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.shards.stage import PipelineError
from pipelines.shards.tario import file_fingerprint

from .dataset_load import STREAM_BATCH_ROWS, data_files, hf_progress, load_local_dataset

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
