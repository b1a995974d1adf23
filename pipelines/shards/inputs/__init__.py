"""The inputs of the shard pipeline, behind one interface (:class:`EmbedInput`).

* :class:`TarShards`: webdataset tar shards, one resume unit per shard.
* :class:`DatasetChunks` over a :class:`DatasetInput`: the rows of a local Hugging Face
  dataset (map-style or a stream), one resume unit per ``chunk_rows`` rows.
* :class:`PrecomputedEmbeddings`: ``.npy`` embeddings + metadata parquet, referenced in
  place (nothing to embed: the stage writes the sample table in one go).
"""

from __future__ import annotations

from .dataset import DatasetInput, recorded_image_cells
from .dataset_embed import DEFAULT_CHUNK_ROWS, ChunkEmbedder, DatasetChunks
from .dataset_load import load_local_dataset
from .precomputed import PrecomputedEmbeddings
from .protocol import EmbedInput, EmbedOptions, EmbedRun
from .tar import TarShards

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "ChunkEmbedder",
    "DatasetChunks",
    "DatasetInput",
    "EmbedInput",
    "EmbedOptions",
    "EmbedRun",
    "PrecomputedEmbeddings",
    "TarShards",
    "load_local_dataset",
    "recorded_image_cells",
]
