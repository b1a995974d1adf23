"""k-means (faiss or torch) and streaming assignment over L2-normalised embeddings."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from .device import faiss_use_gpu, resolve_device
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

    def subset(self, rows: np.ndarray) -> Clustering:
        """The same centroids restricted to ``rows`` (m,): labels and sim of those rows."""
        rows = np.asarray(rows, dtype=np.int64)
        return Clustering(
            centroids=self.centroids, labels=self.labels[rows], sim=self.sim[rows], params=dict(self.params)
        )


BACKENDS = ("auto", "torch", "faiss")


def resolve_backend(backend: str, device: str = "auto") -> str:
    """``"auto"``: faiss on CPU (faiss-gpu on a GPU when installed); torch when the device is
    a GPU that faiss cannot use. Which CPU backend is faster depends on the CPU's BLAS: on
    the 2-core development machine faiss-cpu trained k-means 1.9x faster than torch, on a
    pinned 2-core Xeon torch was 2.5x faster (README); pass ``backend=`` to choose."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        gpu_without_faiss = resolve_device(device).type == "cuda" and not faiss_use_gpu(device)
        return "torch" if gpu_without_faiss else "faiss"
    return backend


def kmeans(x, k: int, *, batch_size: int = 65536, **train_options) -> Clustering:
    """Seeded k-means on L2-normalised rows, then assignment of every row.

    x: (n, d) array, memmap or :class:`~prunecore.rows.ChunkedRows` (never normalised in
    place). ``train_options`` are those of :func:`train_centroids` (``niter=20``,
    ``seed=1234``, ``spherical=True``, ``max_points_per_centroid=256``, ``device="auto"``,
    ``backend="auto"``, ``verbose=False``): training uses at most
    ``k * max_points_per_centroid`` rows; all rows are then assigned in batches of
    ``batch_size`` with :func:`assign`. ``spherical=True`` keeps centroids unit norm
    (assignment by inner product = cosine). ``backend``: ``"faiss"`` (faiss.Kmeans; faiss-gpu
    when ``device`` resolves to CUDA and it is installed), ``"torch"`` (the same Lloyd
    iterations in torch, CPU or GPU) or ``"auto"``.
    """
    centroids, params = train_centroids(x, k, **train_options)
    labels, sim = assign(
        x,
        centroids,
        batch_size=batch_size,
        spherical=params["spherical"],
        device=train_options.get("device", "auto"),
        backend=params["backend"],
    )
    return Clustering(centroids=centroids, labels=labels, sim=sim, params=params)


def train_centroids(
    x,
    k: int,
    *,
    niter: int = 20,
    seed: int = 1234,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    device: str = "auto",
    backend: str = "auto",
    verbose: bool = False,
) -> tuple[np.ndarray, dict]:
    """k-means training only: centroids (k, d) float32 and the parameters used.

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
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    backend = resolve_backend(backend, device)
    n_train = min(n, k * max_points_per_centroid)
    if n_train == n:
        train = l2_normalize(np.asarray(x[0:n]))  # a slice: also loads a ChunkedRows
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        train = l2_normalize(x[rows], row_ids=rows)
    use_gpu = backend == "faiss" and faiss_use_gpu(device)
    if backend == "faiss":
        import faiss

        km = faiss.Kmeans(
            d,
            k,
            niter=niter,
            seed=seed,
            spherical=spherical,
            gpu=use_gpu,
            max_points_per_centroid=max_points_per_centroid,
            verbose=verbose,
        )
        km.train(train)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    else:
        centroids = (
            lloyd_torch(
                torch.from_numpy(train).to(resolve_device(device)), k, niter=niter, seed=seed, spherical=spherical
            )
            .cpu()
            .numpy()
        )
    params = dict(
        k=k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        backend=backend,
        max_points_per_centroid=max_points_per_centroid,
        n_train=n_train,
        gpu=use_gpu or (backend == "torch" and resolve_device(device).type == "cuda"),
    )
    return centroids, params


def nearest_centroid(
    x: torch.Tensor, centroids: torch.Tensor, *, spherical: bool = True, max_block_elems: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best centroid per row of unit rows x (n, d) against centroids (k, d), blockwise.

    Spherical: argmax of ``x . c``; else argmin of ``||x - c||^2`` (argmax of
    ``x . c - ||c||^2 / 2``). Returns labels (n,) int64 and that score (n,).
    Ties go to the lowest centroid id. Memory O(block x k).
    """
    bias = None if spherical else -0.5 * (centroids * centroids).sum(1)
    block = max(1, max_block_elems // centroids.shape[0])
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    score = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], block):
        sims = x[start : start + block] @ centroids.T
        if bias is not None:
            sims += bias
        score[start : start + block], labels[start : start + block] = sims.max(dim=1)
    return labels, score


def lloyd_torch(x: torch.Tensor, k: int, *, niter: int, seed: int, spherical: bool = True) -> torch.Tensor:
    """Lloyd's k-means on unit rows x (n, d) in torch; returns centroids (k, d) float32.

    Seeded init from k distinct rows. An empty cluster is re-seeded at the row currently
    worst served by its centroid (lowest score), so all k centroids stay in use.
    """
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)].clone()
    for _ in range(niter):
        labels, score = nearest_centroid(x, centroids, spherical=spherical)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        centroids = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            centroids[empty] = x[torch.topk(score, empty.numel(), largest=False).indices]
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids.float()


def assign(
    x,
    centroids: np.ndarray,
    *,
    batch_size: int = 65536,
    spherical: bool = True,
    device: str = "auto",
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid for every row, streamed in batches.

    x: (n, d) rows (normalised per batch here); centroids: (k, d). Returns labels (n,) int64
    and sim (n,) float32, the cosine similarity to the assigned centroid. ``spherical=True``
    assigns by inner product with the centroids; ``False`` by Euclidean distance to them.
    """
    x = as_rows(x)
    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids shape {centroids.shape} does not match embeddings width d={x.shape[1]}")
    if not np.isfinite(centroids).all():
        raise ValueError("centroids contain NaN/inf")
    backend = resolve_backend(backend, device)
    unit_centroids = l2_normalize(centroids)
    search_centroids = unit_centroids if spherical else centroids
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
        index.add(np.ascontiguousarray(search_centroids))
    else:
        dev = resolve_device(device)
        torch_centroids = torch.from_numpy(search_centroids).to(dev)
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    for start, batch in iter_row_batches(x, batch_size):
        unit = l2_normalize(batch, row_ids=start)
        if backend == "faiss":
            nearest = index.search(unit, 1)[1][:, 0]
        else:
            nearest = (
                nearest_centroid(torch.from_numpy(unit).to(dev), torch_centroids, spherical=spherical)[0].cpu().numpy()
            )
        stop = start + unit.shape[0]
        labels[start:stop] = nearest
        sim[start:stop] = np.einsum("nd,nd->n", unit, unit_centroids[nearest])
    return labels, sim


def row_centroid_similarity(x, clustering: Clustering, *, batch_size: int = 65536) -> np.ndarray:
    """Cosine of each row (n, d) to its own centroid, recomputed from ``x``: (n,) float32."""
    x = as_rows(x)
    if x.shape[0] != clustering.labels.shape[0]:
        raise ValueError(f"embeddings have {x.shape[0]} rows but the clustering labels {clustering.labels.shape[0]}")
    unit_centroids = l2_normalize(clustering.centroids)
    out = np.empty(x.shape[0], dtype=np.float32)
    for start, batch in iter_row_batches(x, batch_size):
        unit = l2_normalize(batch, row_ids=start)
        own = unit_centroids[clustering.labels[start : start + unit.shape[0]]]
        out[start : start + unit.shape[0]] = np.einsum("nd,nd->n", unit, own)
    return out
