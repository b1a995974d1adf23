"""Helpers shared by the cluster-based methods: clustering on demand, cluster-sorted order."""

from __future__ import annotations

import numpy as np

from prunecore.cluster import Clustering, kmeans
from prunecore.rows import as_rows

ORDERS = ("hard", "easy", "random")


def ensure_clustering(
    emb, clustering: Clustering | None, k: int | None, *, seed: int, device: str = "auto", niter: int = 20
) -> Clustering:
    """Use ``clustering`` if given (checked against ``emb``), else k-means with ``k``."""
    n = emb.shape[0]
    if clustering is None:
        if k is None:
            raise ValueError("pass either a clustering or k (number of clusters)")
        return kmeans(emb, k, seed=seed, device=device, niter=niter)
    if clustering.labels.shape != (n,):
        raise ValueError(f"clustering covers {clustering.labels.shape[0]} rows, embeddings have {n}")
    return clustering


def check_embeddings(emb):
    emb = as_rows(emb)
    if emb.shape[0] == 0:
        raise ValueError("empty embedding array (n = 0): nothing to prune")
    return emb


def cluster_sorted_order(labels: np.ndarray, sim: np.ndarray, order: str, seed: int) -> np.ndarray:
    """Row ids (n,) grouped by cluster (ascending id), ordered inside each cluster.

    ``order="hard"``: farthest from the centroid first (ascending similarity);
    ``"easy"``: nearest first; ``"random"``: seeded shuffle. Ties keep ascending row id.
    """
    if order == "hard":
        key = sim
    elif order == "easy":
        key = -sim
    elif order == "random":
        key = np.random.default_rng(seed).permutation(labels.shape[0])
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return np.lexsort((key, labels))


def group_bounds(sorted_labels: np.ndarray, k: int) -> np.ndarray:
    """Start offsets (k + 1,) of each cluster's run in a cluster-sorted label array."""
    return np.searchsorted(sorted_labels, np.arange(k + 1), side="left")
