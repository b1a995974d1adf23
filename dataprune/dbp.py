"""DBP: density-based pruning by concept-cluster complexity (Abbas, Rusak et al., ICLR 2024).

Per cluster j: ``d_intra = mean(1 - cos(x_i, c_j))``, ``d_inter`` = mean ``1 - c_j.c_l``
over the ``n_neighbors`` nearest other centroids, complexity ``C = d_inter * d_intra``.
Budgets follow ``P = softmax(C / temperature)``: the quota vector solves
``min ||x - P N||^2  s.t.  sum x = N, lb <= x <= ub`` (closed-form water-filling), then is
rounded by largest remainder so it sums to exactly N. Each cluster keeps its quota of rows
farthest from its centroid (``order="hard"``).
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

from prunecore.budget import keep_count
from prunecore.cluster import Clustering, l2_normalize

from ._clusters import check_embeddings, cluster_sorted_order, ensure_clustering, group_bounds
from .deprecation import renamed_function
from .selection import Selection
from .ssp import ssp_scores

BLOCK = 1 << 20  # rows per bincount block (bounded float64 temporaries)


def cluster_complexity(
    emb, clustering: Clustering, *, n_neighbors: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cluster ``(d_intra, d_inter, complexity)``, each (k,) float64.

    ``n_neighbors`` defaults to 20 as in the reference code (a reimplementation uses 5); it
    is capped at k - 1. Undefined values (empty clusters; k = 1 has no neighbours) are NaN in
    d_intra/d_inter and replaced by the mean of the defined complexities (1.0 if none).
    """
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, numbers.Integral) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r}")
    k = clustering.k
    dist = ssp_scores(emb, clustering)  # (n,) float32; summed per cluster in float64, in blocks
    sums = np.zeros(k, dtype=np.float64)
    for s in range(0, dist.shape[0], BLOCK):
        sums += np.bincount(clustering.labels[s : s + BLOCK], weights=dist[s : s + BLOCK], minlength=k)
    del dist
    sizes = clustering.sizes
    with np.errstate(invalid="ignore", divide="ignore"):
        d_intra = sums / sizes
    d_inter = np.full(k, np.nan)
    n_nb = min(n_neighbors, k - 1)
    if n_nb > 0:
        unit = l2_normalize(clustering.centroids).astype(np.float64)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        nearest = -np.partition(-sim, n_nb - 1, axis=1)[:, :n_nb]
        d_inter = (1.0 - nearest).mean(axis=1)
    complexity = d_inter * d_intra
    defined = np.isfinite(complexity)
    fill = complexity[defined].mean() if defined.any() else 1.0
    return d_intra, d_inter, np.where(defined, complexity, fill)


def softmax(values: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(values / temperature)`` in float64, shift-stabilised."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(values, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def quota_bounds(
    sizes: np.ndarray, n_keep: int, *, balance: float = 0.0, min_per_cluster: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Lower/upper quota bounds (k,) int64.

    ``ub_j = |C_j|``; ``lb_j = min(max(floor(balance * N / k), min_per_cluster), |C_j| - 1)``
    (never below 0). The reference code floors lb at 1 (``min_per_cluster=1``) and caps it at
    ``|C_j| - 1``; both are reconstructions exposed as parameters.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    k = sizes.shape[0]
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    floor_lb = max(int(np.floor(balance * n_keep / k)), int(min_per_cluster))
    lb = np.clip(np.minimum(floor_lb, sizes - 1), 0, None)
    return lb, sizes.copy()


def waterfill(target: np.ndarray, total: float, lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``target`` (k,) onto ``{x : sum x = total, lb <= x <= ub}``.

    The solution is ``clip(target + mu, lb, ub)`` for one scalar mu (KKT). mu is bracketed
    by bisection, then solved exactly on the set of unclipped coordinates.
    """
    target, lb, ub = (np.asarray(a, dtype=np.float64) for a in (target, lb, ub))
    if lb.sum() > total + 1e-9 or ub.sum() < total - 1e-9:
        raise ValueError(f"infeasible quotas: need sum(lb)={lb.sum():g} <= N={total:g} <= sum(ub)={ub.sum():g}")
    lo, hi = (lb - target).min() - 1.0, (ub - target).max() + 1.0

    def total_at(mu):
        return np.clip(target + mu, lb, ub).sum()

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total_at(mid) < total:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    mu = 0.5 * (lo + hi)
    x = target + mu
    free = (x > lb) & (x < ub)
    if free.any():
        fixed_sum = np.clip(x, lb, ub)[~free].sum()
        mu = (total - fixed_sum - target[free].sum()) / free.sum()
    return np.clip(target + mu, lb, ub)


def round_to_total(
    x: np.ndarray, total: int, lb: np.ndarray, ub: np.ndarray, priority: np.ndarray | None = None
) -> np.ndarray:
    """Integer vector (k,) within [lb, ub] summing exactly to ``total``, closest to ``x``.

    Floors, then gives the missing units to the largest fractional remainders among entries
    still below ub; ties go to the larger ``priority`` (k,), then to the lower index.
    """
    base = np.clip(np.floor(x + 1e-9), lb, ub).astype(np.int64)
    missing = int(total - base.sum())  # >= 0: floors of a feasible x never exceed the total
    remainder = np.where(base < ub, x - base, -np.inf)
    tie_break = np.zeros_like(x) if priority is None else -np.asarray(priority, dtype=np.float64)
    grant = np.lexsort((tie_break, -remainder))[:missing]
    if missing and not np.isfinite(remainder[grant]).all():
        raise ValueError("cannot place all quota units: clusters are full")
    base[grant] += 1
    return base


def dbp_quotas(
    sizes: np.ndarray,
    complexity: np.ndarray,
    n_keep: int,
    *,
    temperature: float,
    balance: float = 0.0,
    min_per_cluster: int = 1,
) -> np.ndarray:
    """Rows to keep per cluster, (k,) int64, summing exactly to ``n_keep``.

    sizes: (k,) cluster sizes; complexity: (k,) finite. ``temperature`` is required: the
    reference code uses 0.5 (nearly uniform for C in 0.05-0.5), a reimplementation 0.1.
    ``balance`` (reference default 0.5; the paper's best reportedly 0) sets a floor of
    ``balance * N / k`` rows per cluster; see :func:`quota_bounds`.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    complexity = np.asarray(complexity, dtype=np.float64)
    if sizes.ndim != 1 or complexity.shape != sizes.shape:
        raise ValueError(f"sizes {sizes.shape} and complexity {complexity.shape} must be matching 1-D arrays")
    if sizes.size == 0:
        raise ValueError("no clusters given")
    if (sizes < 0).any():
        raise ValueError("cluster sizes must be non-negative")
    if not np.isfinite(complexity).all():
        raise ValueError("complexity contains NaN/inf")
    if isinstance(n_keep, bool) or not isinstance(n_keep, numbers.Integral) or not 0 <= n_keep <= sizes.sum():
        raise ValueError(f"n_keep must be an integer in [0, {sizes.sum()}], got {n_keep!r}")
    lb, ub = quota_bounds(sizes, n_keep, balance=balance, min_per_cluster=min_per_cluster)
    if lb.sum() > n_keep:
        raise ValueError(
            f"the per-cluster floors need {lb.sum()} rows but only n_keep="
            f"{n_keep} are kept: lower min_per_cluster/balance or keep more"
        )
    p = softmax(complexity, temperature)
    x = waterfill(p * n_keep, n_keep, lb, ub)
    return round_to_total(x, n_keep, lb, ub, priority=complexity)


def take_per_cluster(
    labels: np.ndarray, sim: np.ndarray, quotas: np.ndarray, *, order: str = "hard", seed: int = 1234
) -> np.ndarray:
    """Keep mask (n,): the first ``quotas[j]`` rows of cluster j in ``order`` (see
    :func:`dataprune._clusters.cluster_sorted_order`)."""
    walk = cluster_sorted_order(labels, sim, order, seed)
    starts = group_bounds(labels[walk], quotas.shape[0])  # one (n,) temporary, freed here
    keep = np.zeros(labels.shape[0], dtype=bool)
    for j in np.flatnonzero(quotas > 0):  # k slices: no per-row rank arrays
        keep[walk[starts[j] : starts[j] + quotas[j]]] = True
    return keep


def dbp(
    emb,
    keep: float | int,
    *,
    k: int | None = None,
    temperature: float,
    n_neighbors: int = 20,
    balance: float = 0.0,
    order: str = "hard",
    clustering: Clustering | None = None,
    min_per_cluster: int = 1,
    seed: int = 1234,
    device: str = "auto",
) -> Selection:
    """DBP over emb (n, d): keep ``keep`` (fraction or count) rows with complexity quotas.

    ``order``: which rows fill a cluster's quota first: ``"hard"`` the farthest from the
    centroid, ``"easy"`` the nearest, ``"random"`` a seeded shuffle (as in :func:`semdedup`
    and :func:`ssp`). Dropped rows carry reason ``"quota"``; the score is ``1 - cos`` to the
    own centroid; ``stats["dbp"]`` holds per-cluster size, d_intra, d_inter, complexity, P and quota.
    """
    emb = check_embeddings(emb)
    n_keep = keep_count(emb.shape[0], keep)
    clustering = ensure_clustering(emb, clustering, k, seed=seed, device=device)
    d_intra, d_inter, complexity = cluster_complexity(emb, clustering, n_neighbors=n_neighbors)
    sizes = clustering.sizes
    quotas = dbp_quotas(
        sizes, complexity, n_keep, temperature=temperature, balance=balance, min_per_cluster=min_per_cluster
    )
    mask = take_per_cluster(clustering.labels, clustering.sim, quotas, order=order, seed=seed)
    stats = pd.DataFrame(
        {
            "cluster": np.arange(clustering.k),
            "size": sizes,
            "d_intra": d_intra,
            "d_inter": d_inter,
            "complexity": complexity,
            "p": softmax(complexity, temperature),
            "quota": quotas,
        }
    )
    return Selection.from_mask(mask, "quota", scores=1.0 - clustering.sim, stats={"dbp": stats})


prune_dbp = renamed_function(dbp, "prune_dbp")
