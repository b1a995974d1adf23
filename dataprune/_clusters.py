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
    check_clustering(clustering)
    return clustering


def check_clustering(clustering: Clustering) -> None:
    """Raise ValueError unless every label is a centroid id in [0, k) and every sim is finite
    (a negative label would silently index centroids from the end; NaN would silently reorder)."""
    labels, k = np.asarray(clustering.labels), int(clustering.centroids.shape[0])
    if labels.size == 0:
        return
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"cluster labels must be integers, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        bad = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
        raise ValueError(
            f"cluster label {int(labels[bad])} at row {bad} is outside [0, {k}) ({k} centroids): "
            "labels must index the clustering's centroids"
        )
    sim = np.asarray(clustering.sim)
    if sim.shape != labels.shape:
        raise ValueError(f"clustering.sim has shape {sim.shape}, labels {labels.shape}")
    finite = np.isfinite(sim)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"clustering.sim has {int((~finite).sum())} non-finite value(s) (first at row {bad}: {sim[bad]}): "
            "recompute the row-centroid similarities"
        )


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
