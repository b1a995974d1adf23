"""faiss k-means and streaming assignment over L2-normalised embeddings."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import faiss
import numpy as np

from .device import faiss_use_gpu
from .rows import as_rows, iter_row_batches


def l2_normalize(x: np.ndarray, *, row_ids: int | np.ndarray = 0) -> np.ndarray:
    """Rows of ``x`` (n, d) scaled to unit norm, as a new float32 array (n, d).

    Raises ValueError naming the offending row indices for NaN/inf entries or zero-norm
    rows. ``row_ids`` maps local rows to the caller's numbering: an int offset (streamed
    batches) or an (n,) array of global row ids (samples).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"embeddings contain NaN/inf in rows {_first_rows(bad, row_ids)}")
    norms = np.linalg.norm(x, axis=1)
    zero = norms == 0
    if zero.any():
        raise ValueError(f"embeddings have zero norm in rows {_first_rows(zero, row_ids)}")
    return x / norms[:, None]


def _first_rows(mask: np.ndarray, row_ids: int | np.ndarray, limit: int = 10) -> str:
    local = np.flatnonzero(mask)
    rows = local + row_ids if isinstance(row_ids, numbers.Integral) else np.asarray(row_ids)[local]
    shown = ", ".join(str(r) for r in rows[:limit])
    return f"[{shown}{', ...' if rows.size > limit else ''}] ({rows.size} in all)"


@dataclass
class Clustering:
    """Result of :func:`kmeans` (or class prototypes).

    centroids: (k, d) float32; labels: (n,) int64 cluster of each row; sim: (n,) float32
    cosine similarity of each row to its own centroid; params: how it was made.
    """

    centroids: np.ndarray
    labels: np.ndarray
    sim: np.ndarray
    params: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def sizes(self) -> np.ndarray:
        """Rows per cluster, (k,) int64 (zero for empty clusters)."""
        return np.bincount(self.labels, minlength=self.k).astype(np.int64)

    def subset(self, rows: np.ndarray) -> "Clustering":
        """The same centroids restricted to ``rows`` (m,): labels and sim of those rows."""
        rows = np.asarray(rows, dtype=np.int64)
        return Clustering(centroids=self.centroids, labels=self.labels[rows],
                          sim=self.sim[rows], params=dict(self.params))


def kmeans(x, k: int, *, niter: int = 20, seed: int = 1234, spherical: bool = True,
           max_points_per_centroid: int = 256, device: str = "auto",
           batch_size: int = 65536, verbose: bool = False) -> Clustering:
    """Seeded faiss k-means on L2-normalised rows, then assignment of every row.

    x: (n, d) array, memmap or :class:`~prunecore.rows.ChunkedRows` (never normalised in
    place). Training (:func:`train_centroids`) uses at most ``k * max_points_per_centroid``
    rows; all rows are then assigned in batches of ``batch_size`` with :func:`assign`.
    ``spherical=True`` keeps centroids unit norm (assignment by inner product = cosine).
    Runs on GPU when ``device`` resolves to CUDA and faiss-gpu is installed.
    """
    centroids, params = train_centroids(x, k, niter=niter, seed=seed, spherical=spherical,
                                        max_points_per_centroid=max_points_per_centroid,
                                        device=device, verbose=verbose)
    labels, sim = assign(x, centroids, batch_size=batch_size, spherical=spherical)
    return Clustering(centroids=centroids, labels=labels, sim=sim, params=params)


def train_centroids(x, k: int, *, niter: int = 20, seed: int = 1234, spherical: bool = True,
                    max_points_per_centroid: int = 256, device: str = "auto",
                    verbose: bool = False) -> tuple[np.ndarray, dict]:
    """faiss k-means training only: centroids (k, d) float32 and the parameters used.

    Trains on a seeded uniform sample of ``min(n, k * max_points_per_centroid)`` rows drawn
    here (so a memmap is never loaded whole); the sample size is recorded as ``n_train``.
    """
    x = as_rows(x)
    n, d = x.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n == 0:
        raise ValueError("cannot cluster an empty embedding array (n = 0)")
    if k > n:
        raise ValueError(f"k={k} clusters requested for only n={n} rows (need k <= n)")
    if max_points_per_centroid < 1:
        raise ValueError("max_points_per_centroid must be >= 1")
    n_train = min(n, k * max_points_per_centroid)
    if n_train == n:
        train = l2_normalize(np.asarray(x[0:n]))  # a slice: also loads a ChunkedRows
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        train = l2_normalize(x[rows], row_ids=rows)
    use_gpu = faiss_use_gpu(device)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=spherical, gpu=use_gpu,
                      max_points_per_centroid=max_points_per_centroid, verbose=verbose)
    km.train(train)
    params = dict(k=k, niter=niter, seed=seed, spherical=spherical,
                  max_points_per_centroid=max_points_per_centroid, n_train=n_train,
                  gpu=use_gpu)
    return np.ascontiguousarray(km.centroids, dtype=np.float32), params


def assign(x, centroids: np.ndarray, *, batch_size: int = 65536,
           spherical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid for every row, streamed in batches.

    x: (n, d) rows (normalised per batch here); centroids: (k, d). Returns labels (n,) int64
    and sim (n,) float32, the cosine similarity to the assigned centroid. ``spherical=True``
    assigns by inner product with the centroids; ``False`` by Euclidean distance to them.
    """
    x = as_rows(x)
    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids shape {centroids.shape} does not match embeddings "
                         f"width d={x.shape[1]}")
    if not np.isfinite(centroids).all():
        raise ValueError("centroids contain NaN/inf")
    unit_centroids = l2_normalize(centroids)
    index = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(unit_centroids if spherical else centroids))
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    for start, batch in iter_row_batches(x, batch_size):
        unit = l2_normalize(batch, row_ids=start)
        _, nearest = index.search(unit, 1)
        stop = start + unit.shape[0]
        labels[start:stop] = nearest[:, 0]
        sim[start:stop] = np.einsum("nd,nd->n", unit, unit_centroids[nearest[:, 0]])
    return labels, sim


def row_centroid_similarity(x, clustering: Clustering, *, batch_size: int = 65536) -> np.ndarray:
    """Cosine of each row (n, d) to its own centroid, recomputed from ``x``: (n,) float32."""
    x = as_rows(x)
    if x.shape[0] != clustering.labels.shape[0]:
        raise ValueError(f"embeddings have {x.shape[0]} rows but the clustering labels "
                         f"{clustering.labels.shape[0]}")
    unit_centroids = l2_normalize(clustering.centroids)
    out = np.empty(x.shape[0], dtype=np.float32)
    for start, batch in iter_row_batches(x, batch_size):
        unit = l2_normalize(batch, row_ids=start)
        own = unit_centroids[clustering.labels[start:start + unit.shape[0]]]
        out[start:start + unit.shape[0]] = np.einsum("nd,nd->n", unit, own)
    return out
