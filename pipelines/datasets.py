"""Hugging Face datasets and parquet tables as pipeline input and output.

``run_filter(hf_dataset=PATH_OR_DATASET, ...)`` / ``prunekit filter --hf-dataset PATH``
embeds the rows of a local dataset (a ``save_to_disk`` folder, a folder of parquet / arrow /
webdataset files, such files or a glob of them, or a ``datasets.Dataset`` object), runs the
same cluster and select stages as for tar shards, and writes the kept rows as a new dataset.

* **input** (:class:`~pipelines.shards.inputs.DatasetInput`, cut into resume units by
  :class:`~pipelines.shards.inputs.DatasetChunks`): one of the embed stage's inputs, beside
  tar shards. The one :class:`~pipelines.shards.embed.EmbedStage` embeds it: either the
  image column is decoded and encoded with the tar path's encoder and functions (same
  batching, same resume unit semantics: one chunk of ``chunk_rows`` rows), or an embedding
  column is read straight from Arrow into the chunk files. Keys are the id column (as
  strings) or the row index.
* **write** (the one :class:`~pipelines.shards.write.WriteStage` with a
  :class:`~pipelines.shards.write_dataset.DatasetOutput`): the kept rows, in input order,
  byte-identical (the Arrow rows are copied, never decoded), as a ``save_to_disk`` folder
  or parquet shards under ``OUT/write/dataset``, built in ``OUT/write/dataset.incomplete``
  and renamed.

Streaming inputs (an ``IterableDataset``, or ``--streaming`` to read local files without
``load_dataset``'s Arrow cache) go through the same stages in one sequential pass per stage:
memory is bounded by one batch of rows plus one chunk's embeddings and keys; a killed run
keeps its finished chunks / output shards and re-reads the stream from the start to reach
the first unfinished one (the keys of the finished chunks are compared on the way, so a
changed stream is detected). Streaming output is parquet shards.
"""

from __future__ import annotations

import warnings

from pipelines.shards.decode import decode_options_of
from pipelines.shards.embed import EmbedStage
from pipelines.shards.inputs import (
    DEFAULT_CHUNK_ROWS,
    ChunkEmbedder,
    DatasetChunks,
    DatasetInput,
    load_local_dataset,
    recorded_image_cells,
)
from pipelines.shards.inputs.dataset import embedding_rows
from pipelines.shards.select import SelectArtifact
from pipelines.shards.write import WriteStage
from pipelines.shards.write_dataset import DatasetOutput


def dataset_embed_stage(out, cfg, encoder, *, text: bool, executor=None) -> tuple[DatasetInput, EmbedStage]:
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
    stage = EmbedStage(
        out,
        DatasetChunks(source, cfg.chunk_rows),
        encoder,
        batch_size=cfg.batch_size,
        text=text,
        dtype=cfg.storage_dtype,
        strict=cfg.strict,
        decode=decode_options_of(cfg),
        progress=cfg.progress,
        executor=executor,
        threads=cfg.threads,
    )
    return source, stage


def dataset_write_stage(out, select: SelectArtifact, source: DatasetInput, cfg) -> WriteStage:
    """The write stage of ``run_filter`` for a dataset input (``cfg``: a FilterConfig)."""
    output = DatasetOutput(
        source, output_format=cfg.hf_output_format, max_count=cfg.shard_max_count, max_size=cfg.shard_max_size
    )
    return WriteStage(out, select, output, progress=cfg.progress)


def DatasetEmbedStage(out, source: DatasetInput, encoder=None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, **options):  # noqa: N802 - a deprecated class name
    """Deprecated (kept for one release): ``EmbedStage(out, DatasetChunks(source, chunk_rows), encoder, ...)``."""
    warnings.warn(
        "DatasetEmbedStage is deprecated: use EmbedStage(out, DatasetChunks(source, chunk_rows), encoder, ...)",
        DeprecationWarning,
        stacklevel=2,
    )
    return EmbedStage(out, DatasetChunks(source, chunk_rows), encoder, **options)


def DatasetWriteStage(out, select: SelectArtifact, source: DatasetInput, *, progress: bool = True, **options):  # noqa: N802 - a deprecated class name
    """Deprecated (kept for one release): ``WriteStage(out, select, DatasetOutput(source, ...))``."""
    warnings.warn(
        "DatasetWriteStage is deprecated: use WriteStage(out, select, DatasetOutput(source, ...))",
        DeprecationWarning,
        stacklevel=2,
    )
    return WriteStage(out, select, DatasetOutput(source, **options), progress=progress)


__all__ = [
    "ChunkEmbedder",
    "DatasetChunks",
    "DatasetEmbedStage",
    "DatasetInput",
    "DatasetOutput",
    "DatasetWriteStage",
    "dataset_embed_stage",
    "dataset_write_stage",
    "embedding_rows",
    "load_local_dataset",
    "recorded_image_cells",
]
