"""SemDeDup: semantic de-duplication inside k-means clusters, exact and blockwise.

Within each cluster rows are walked in an ``order`` (``hard``: farthest from the centroid
first). :func:`semdedup` answers one eps with a :class:`Selection`, :func:`semdedup_sweep`
several eps from one pass with ``{eps: Selection}``. Two rules (spec: specs/dataprune.md):

* ``rule="reference"`` (facebookresearch/SemDeDup code): row j is dropped iff its cosine
  similarity to ANY earlier row of its cluster is ``> 1 - eps``, even a dropped one. This only
  needs ``M_j = max_{i<j} cos(x_i, x_j)``, so every eps is answered from one pass.
* ``rule="greedy"`` (paper wording): keep a row unless it is ``> 1 - eps`` similar to an
  earlier KEPT row. Exact sequential semantics, resolved block by block.

Each block of rows is compared with all earlier rows of its cluster in one matrix product,
so the upper triangle is never computed, memory is O(cluster x block), and the result is
exact across the whole cluster (no chunk boundary misses a pair).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from prunecore.cluster import Clustering, l2_normalize
from prunecore.device import resolve_device
from prunecore.memory import cap_mmap_threshold

from ._clusters import check_embeddings, cluster_sorted_order, ensure_clustering, group_bounds
from .deprecation import warn_renamed
from .selection import Selection

RULES = ("reference", "greedy")


def semdedup(emb, eps: float, **options) -> Selection:
    """De-duplicate ``emb`` (n, d) within clusters at one threshold ``eps``: a :class:`Selection`.

    A pair is a duplicate when cosine ``> 1 - eps``. ``options`` are those of
    :func:`semdedup_sweep`: ``clustering`` / ``k`` (a precomputed
    :class:`~prunecore.cluster.Clustering` or a k for :func:`prunecore.kmeans`, seeded by
    ``seed``), ``order`` (``"hard"``: each cluster walked farthest from the centroid first,
    ``"easy"`` nearest first, ``"random"`` a seeded shuffle), ``rule``, ``block_size``,
    ``seed``, ``device``, ``progress``, ``workers``.

    Several thresholds at once (one pass) are :func:`semdedup_sweep`; a sequence given here
    still returns its ``{eps: Selection}`` dict with a ``DeprecationWarning`` (removed in the
    next release).
    """
    if hasattr(eps, "__iter__") and not isinstance(eps, str):
        warn_renamed("semdedup(emb, [eps, ...])", "semdedup_sweep(emb, [eps, ...]) for {eps: Selection}")
        return semdedup_sweep(emb, eps, **options)
    return next(iter(semdedup_sweep(emb, [eps], **options).values()))


def semdedup_sweep(
    emb,
    eps: Sequence[float],
    *,
    clustering: Clustering | None = None,
    k: int | None = None,
    order: str = "hard",
    rule: str = "reference",
    block_size: int | None = None,
    seed: int = 1234,
    device: str = "auto",
    progress: bool = False,
    workers: int | None = None,
) -> dict[float, Selection]:
    """SemDeDup of ``emb`` (n, d) at several thresholds from a single pass: ``{eps: Selection}``
    (keys: the thresholds as floats, in the order given).

    A pair is a duplicate when cosine ``> 1 - eps``.
    clustering / k: a precomputed :class:`~prunecore.cluster.Clustering` or a k for
    :func:`prunecore.kmeans` (seeded by ``seed``).
    order: the walk inside each cluster (``"hard"``: farthest from the centroid first, so the
    hardest copy of a duplicate group is kept; ``"easy"``: nearest first; ``"random"``: a
    seeded shuffle); the same word and values as :func:`~dataprune.dbp` and :func:`~dataprune.ssp`.
    block_size: rows per similarity block (None = automatic, see :func:`auto_block_size`).
    Scores are ``M_j``, the highest cosine of row j to an earlier row of its cluster in walk
    order (NaN for the first row of each cluster). Dropped rows carry reason ``"duplicate"``;
    ``stats["semdedup"]`` has per-cluster size and kept counts at that eps.
    workers: clusters processed at once on a CPU (None: torch's thread count). Each cluster
    runs its small products on ONE thread and the clusters run side by side, so no product
    waits at an OpenMP barrier for a thread another process has descheduled; results do not
    depend on ``workers``.
    """
    emb = check_embeddings(emb)
    eps_list = _check_eps(eps)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    clustering = ensure_clustering(emb, clustering, k, seed=seed, device=device)
    dev = resolve_device(device)
    thresholds = torch.tensor([1.0 - e for e in eps_list], dtype=torch.float32, device=dev)

    n = emb.shape[0]
    walk = cluster_sorted_order(clustering.labels, clustering.sim, order, seed)
    bounds = group_bounds(clustering.labels[walk], clustering.k)
    max_prev = np.full(n, np.nan, dtype=np.float32)
    dropped = np.zeros((len(eps_list), n), dtype=bool)
    sizes_in_walk = np.diff(bounds)
    clusters = np.flatnonzero(sizes_in_walk > 1)
    clusters = clusters[np.argsort(-sizes_in_walk[clusters], kind="stable")]  # largest first: balanced workers

    def dedup_cluster(c: int):
        rows = walk[bounds[c] : bounds[c + 1]]
        x = torch.from_numpy(_gather_unit_rows(emb, rows)).to(dev)
        block = auto_block_size(rows.shape[0], block_size)
        if rule == "reference":
            m = max_similarity_to_earlier(x, block)
            drop = m.unsqueeze(0) > thresholds.unsqueeze(1)
        else:
            m, drop = greedy_duplicates(x, thresholds, block)
        return rows, m.cpu().numpy(), drop.cpu().numpy()

    with cluster_parallel(dev, workers) as run_all:
        done = run_all(dedup_cluster, clusters)
        if progress:
            from tqdm.auto import tqdm

            done = tqdm(done, total=len(clusters), desc="semdedup clusters")
        for rows, m, drop in done:
            max_prev[rows[1:]] = m[1:]
            dropped[:, rows] = drop

    sizes = clustering.sizes
    selections = {}
    for i, e in enumerate(eps_list):
        keep = ~dropped[i]
        kept_per_cluster = np.bincount(clustering.labels[keep], minlength=clustering.k)
        stats = pd.DataFrame({"cluster": np.arange(clustering.k), "size": sizes, "kept": kept_per_cluster, "eps": e})
        selections[e] = Selection.from_mask(keep, "duplicate", scores=max_prev, stats={"semdedup": stats})
    return selections


@contextmanager
def cluster_parallel(device: torch.device, workers: int | None = None):
    """Yield ``run_all(fn, items)``: an iterator of ``fn(item)`` results, in completion order.

    On a CPU: ``workers`` (default: torch's thread count) Python threads, each item on one
    thread with torch's intra-op threads set to 1 for the duration (restored after). On a GPU:
    items one after another in this thread. On glibc, large allocations are then served by
    mmap (:func:`prunecore.memory.cap_mmap_threshold`), so what a worker frees leaves the
    resident set.
    """
    if device.type != "cpu":
        yield lambda fn, items: (fn(item) for item in items)
        return
    previous = torch.get_num_threads()
    workers = previous if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cap_mmap_threshold()  # per-cluster arrays freed in worker threads go back to the OS
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:

            def run_all(fn, items):
                futures = [pool.submit(fn, item) for item in items]
                try:
                    for future in as_completed(futures):
                        yield future.result()
                finally:
                    for future in futures:
                        future.cancel()

            yield run_all
    finally:
        torch.set_num_threads(previous)


def _check_eps(eps) -> list[float]:
    values = [eps] if isinstance(eps, numbers.Real) else list(eps)
    if not values:
        raise ValueError("eps: give at least one threshold")
    for e in values:
        if isinstance(e, bool) or not isinstance(e, numbers.Real) or not 0 <= e < 2:
            raise ValueError(f"eps must be a number in [0, 2), got {e!r}")
    return [float(e) for e in values]


def _gather_unit_rows(emb, rows: np.ndarray) -> np.ndarray:
    """Unit-norm float32 rows ``emb[rows]`` in the given order, read in ascending row order."""
    read_order = np.argsort(rows, kind="stable")
    block = np.empty((rows.shape[0], emb.shape[1]), dtype=np.float32)
    block[read_order] = np.asarray(emb[rows[read_order]], dtype=np.float32)
    return l2_normalize(block, row_ids=rows)


def auto_block_size(m: int, block_size: int | None, max_block_elems: int = 1 << 25) -> int:
    """Rows per block for a cluster of ``m`` rows.

    Auto (``block_size=None``): about m/8 rounded up to 64 (so the skipped upper triangle
    saves ~40% of the products), within [64, 1024], and at most ``max_block_elems / m`` rows
    so the (block x m) similarity slab stays bounded (128 MiB in float32).
    """
    if block_size is None:
        block_size = min(1024, max(64, -(-m // 8 // 64) * 64))
    return max(1, min(block_size, max(1, max_block_elems // max(m, 1))))


def max_similarity_to_earlier(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``M_j = max_{i<j} x_i . x_j`` for unit rows x (m, d); ``-inf`` for j = 0. Returns (m,).

    One product per row block against all earlier rows, (block x r1): the upper triangle is
    never computed and memory is O(block x m).
    """
    m = x.shape[0]
    out = torch.empty((m,), dtype=x.dtype, device=x.device)
    for r0, r1, sim in _similarity_to_earlier_blocks(x, block_size):
        out[r0:r1] = sim.amax(dim=1)
    return out


def _similarity_to_earlier_blocks(x: torch.Tensor, block_size: int):
    """Yield ``(r0, r1, sim)`` per row block of unit rows x (m, d): ``sim`` (r1-r0, r1) holds
    ``x_i . x_j`` for the block's rows i against rows j < r1, ``-inf`` where j is not earlier than i."""
    m = x.shape[0]
    ids = torch.arange(min(block_size, m), device=x.device)
    not_earlier = ids.unsqueeze(0) >= ids.unsqueeze(1)  # one diagonal-tile mask per cluster
    for r0 in range(0, m, block_size):
        r1 = min(r0 + block_size, m)
        sim = x[r0:r1] @ x[:r1].T
        sim[:, r0:].masked_fill_(not_earlier[: r1 - r0, : r1 - r0], float("-inf"))
        yield r0, r1, sim


def greedy_duplicates(x: torch.Tensor, thresholds: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rule over unit rows x (m, d) in walk order, for thresholds (E,) at once.

    Row j is dropped iff ``x_i . x_j > t`` for some earlier KEPT row i. Returns ``M`` (m,)
    (max similarity to any earlier row, as in the reference rule) and ``drop`` (E, m) bool.
    Columns of earlier blocks are masked to the kept rows; inside a block the sequential
    walk is resolved by fixed-point rounds (each round settles at least the earliest
    undecided row), all vectorised.
    """
    m = x.shape[0]
    max_prev = torch.empty((m,), dtype=x.dtype, device=x.device)
    drop = torch.zeros((thresholds.shape[0], m), dtype=torch.bool, device=x.device)
    for r0, r1, sim in _similarity_to_earlier_blocks(x, block_size):
        max_prev[r0:r1] = sim.amax(dim=1)
        over = sim.unsqueeze(0) > thresholds.view(-1, 1, 1)  # (E, b, r1)
        hit_kept = (over[:, :, :r0] & ~drop[:, :r0].unsqueeze(1)).any(dim=2)
        drop[:, r0:r1] = _resolve_block(over[:, :, r0:], hit_kept)
    return max_prev, drop


def _resolve_block(edges: torch.Tensor, dropped_before: torch.Tensor) -> torch.Tensor:
    """Sequential greedy walk inside one block, vectorised.

    edges: (E, b, b) bool, ``edges[e, j, i]`` = row i is earlier than j and too similar.
    dropped_before: (E, b) rows already dropped by kept rows of earlier blocks.
    Returns drop (E, b). A row is kept iff no kept earlier row is linked to it.
    """
    drop = dropped_before.clone()
    undecided = ~dropped_before
    kept = torch.zeros_like(undecided)
    while undecided.any():
        # rows linked to a kept row are dropped; rows linked to no live row are kept
        linked_kept = (edges & kept.unsqueeze(1)).any(dim=2)
        linked_live = (edges & (kept | undecided).unsqueeze(1)).any(dim=2)
        newly_dropped = undecided & linked_kept
        newly_kept = undecided & ~linked_live
        drop |= newly_dropped
        kept |= newly_kept
        undecided &= ~(newly_dropped | newly_kept)
    return drop


def semdedup_flops(sizes: np.ndarray, d: int, block_size: int | None = None) -> float:
    """Floating-point operations (2 x multiply-adds) of the row-block products that
    :func:`semdedup` computes for clusters of these ``sizes`` (k,) at width ``d``."""
    total = 0.0
    for m in np.asarray(sizes)[np.asarray(sizes) > 1]:
        b = auto_block_size(int(m), block_size)
        ends = np.minimum(np.arange(0, m, b) + b, m)
        total += 2.0 * d * float(((ends - np.arange(0, m, b)) * ends).sum())
    return total
