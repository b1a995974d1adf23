"""A Hugging Face dataset's rows as the embed stage's input: one resume unit (chunk) per
``chunk_rows`` rows.

Image column: the cells are decoded and encoded with the tar path's loop
(:func:`~pipelines.shards.batches.embed_stream`: same batching, decode workers, JPEG draft,
pixel cap). Embedding column: the rows are read straight from Arrow (a fixed-size list of
floats becomes a numpy view of the Arrow buffer, no copy). Keys are the id column (as
strings) or the row index. A stream is read in one sequential pass: chunks a killed run
finished are read past, their keys compared with the stream's (a changed stream is detected).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.shards.batches import EmbeddedBatch, embed_stream, encode_in_slots
from pipelines.shards.chunks import EmbeddedUnit, chunk_paths
from pipelines.shards.stage import NO_EMBEDDING, STATUS_OK, PipelineError
from pipelines.shards.tario import ShardScan
from pipelines.shards.threads import resolve_threads

from .dataset import DatasetInput, embedding_rows, image_payload, row_keys
from .protocol import EmbedOptions, EmbedRun

DEFAULT_CHUNK_ROWS = 10_000


class DatasetChunks:
    """The rows of ``source`` (a :class:`~pipelines.shards.inputs.dataset.DatasetInput`)
    in units of ``chunk_rows`` rows; a unit's label is ``LABEL[a:b]`` (rows a..b-1), its
    sample table's ``index`` the row index and ``nbytes`` the encoded image's size."""

    def __init__(self, source: DatasetInput, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.source, self.chunk_rows = source, chunk_rows
        self.label = source.label
        self.rows_read = 0  # a stream: rows read by the last pass

    precomputed = False

    @property
    def streaming(self) -> bool:
        return self.source.streaming

    @property
    def decodes_images(self) -> bool:
        return not self.source.embedding_column

    def units(self) -> list[str]:
        n_rows = self.rows_read if self.streaming else self.source.n_rows
        return self.source.chunk_labels(self.chunk_rows, n_rows)

    def embed_params(self, encoder, encoder_fingerprint, options: EmbedOptions) -> dict:
        """Raises :class:`PipelineError` when captions are asked for but cannot be embedded."""
        source = self.source
        if source.embedding_column:
            if options.text:
                raise PipelineError(
                    "CLIP score needs caption embeddings, which an embedding column does not give: "
                    "embed the image column with a CLIP model (--model) and --text-column"
                )
            encoder_fp = {"column": source.embedding_column}
        else:
            if options.text and not source.text_column:
                raise PipelineError("CLIP score needs captions: give --text-column")
            if encoder is None and encoder_fingerprint is None:
                raise ValueError("give an encoder/model to embed the image column, or --embedding-column")
            encoder_fp = encoder_fingerprint if encoder_fingerprint is not None else encoder.fingerprint
        params = {
            "encoder": encoder_fp,
            "columns": source.roles(),
            "batch_size": options.batch_size,
            "chunk_rows": self.chunk_rows,
            "text": bool(options.text),
            "dtype": options.dtype,
            "strict": bool(options.strict),
        }
        if not source.embedding_column:
            params["decode"] = options.decode.fingerprint()
            params["threads"] = resolve_threads(options.threads)  # as the tar path's
        return params

    def record_inputs(self) -> dict:
        return {"dataset": self.source.fingerprint()}

    def embed_units(self, todo: Sequence[int], run: EmbedRun) -> Iterator[EmbeddedUnit]:
        """Embed chunks ``todo`` of a map-style dataset (chunk ``i``: rows ``i * chunk_rows ...``)."""
        size = self.chunk_rows
        columns = self.source.embed_columns(run.text)
        for i in todo:
            start, stop = i * size, min((i + 1) * size, self.source.n_rows)
            embedder = ChunkEmbedder(self.source, run)
            embedder.run(self.source.iter_tables(columns, run.batch_size, start, stop))
            yield self.unit(i, embedder)

    def embed_pass(self, run: EmbedRun) -> Iterator[EmbeddedUnit]:
        """One pass over a stream: rows are cut into chunks of ``chunk_rows``; chunks finished
        in ``run.stage_dir`` are read past (their keys compared with the stream's)."""
        columns = self.source.embed_columns(run.text)
        self.rows_read = 0

        def tables():
            for lo, part in self.source.iter_tables(columns, run.batch_size):
                self.rows_read = lo + part.num_rows
                yield lo, part

        for i, group in itertools.groupby(split_at_chunks(tables(), self.chunk_rows), key=lambda item: item[0]):
            parts = ((row, part) for _, row, part in group)
            finished = chunk_paths(run.stage_dir, i)["keys"]
            if finished.exists():
                FinishedChunk(finished, self.source.id_column).verify(parts)
                continue
            embedder = ChunkEmbedder(self.source, run)
            embedder.run(parts)
            yield self.unit(i, embedder)

    def unit(self, i: int, embedder: ChunkEmbedder) -> EmbeddedUnit:
        table, images, texts = embedder.finish()
        return EmbeddedUnit(i, table, images, texts, ShardScan(f"{self.source.label}[chunk {i}]"), self.source.dim)


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

    Image column: cells go through the tar path's :func:`~pipelines.shards.batches.embed_stream`
    with the stage's decoder (parallel decode workers, JPEG draft, pixel cap), in encoder
    batches fixed by row index (row ``r`` in slot ``r % batch_size``), as the tar path's are
    by a sample's index in its shard: a chunk boundary or a stream changes no row. Embedding
    column: the rows are taken from the Arrow buffers (:func:`embedding_rows`); null or
    non-finite ones get ``no_embedding``.
    """

    def __init__(self, source: DatasetInput, run: EmbedRun):
        self.source, self.encoder, self.decoder = source, run.encoder, run.decoder
        self.batch_size, self.text, self.strict = run.batch_size, run.text, run.strict
        self.progress, self.on_sample, self.timing = run.progress, run.on_sample, run.timing
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
