"""Shared tools: embedding, faiss clustering and search, selection utilities, devices."""
from .cluster import (Clustering, assign, kmeans, l2_normalize, row_centroid_similarity,
                      train_centroids)
from .device import faiss_use_gpu, resolve_device
from .rows import ChunkedRows, as_rows, iter_row_batches, open_embeddings
from .select import keep_count, rank_order, top_k_mask

__all__ = [
    "ChunkedRows", "Clustering", "as_rows", "assign", "faiss_use_gpu", "iter_row_batches",
    "keep_count", "kmeans", "l2_normalize", "open_embeddings", "rank_order", "resolve_device",
    "row_centroid_similarity", "top_k_mask", "train_centroids",
]
