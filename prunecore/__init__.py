"""The shared core both halves import: budgets, stable top-k, devices and dtypes, atomic
writes and digests, the one model loader, embedding, faiss clustering, row sources, and
:class:`Registry` (the one shape of every extension point).

Importing it loads no faiss, open_clip or transformers: those load inside the functions
that need them.
"""

from .budget import (
    check_keep,
    keep_count,
    keep_counts,
    keep_from_sparsity,
    rank_order,
    top_k_mask,
    torch_rank,
    torch_top_k,
)
from .cluster import Clustering, assign, kmeans, l2_normalize, row_centroid_similarity, train_centroids
from .device import faiss_use_gpu, resolve_device, resolve_dtype
from .io import atomic_path, atomic_write_bytes, atomic_write_json, file_digest, json_digest
from .models import load_open_clip, load_tokenizer, load_transformers
from .registry import Registry
from .rows import ChunkedRows, LazyRows, RowSubset, as_rows, iter_row_batches, open_embeddings

__version__ = "0.2.0"

__all__ = [
    "ChunkedRows",
    "Clustering",
    "LazyRows",
    "Registry",
    "RowSubset",
    "__version__",
    "as_rows",
    "assign",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_keep",
    "faiss_use_gpu",
    "file_digest",
    "iter_row_batches",
    "json_digest",
    "keep_count",
    "keep_counts",
    "keep_from_sparsity",
    "kmeans",
    "l2_normalize",
    "load_open_clip",
    "load_tokenizer",
    "load_transformers",
    "open_embeddings",
    "rank_order",
    "resolve_device",
    "resolve_dtype",
    "row_centroid_similarity",
    "top_k_mask",
    "torch_rank",
    "torch_top_k",
    "train_centroids",
]
