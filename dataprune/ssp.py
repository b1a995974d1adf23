"""SSP: self-supervised prototypicality (Sorscher et al., NeurIPS 2022).

Score = distance to the row's own prototype, ``1 - cos(x_i, c_{a(i)})``. ``order="hard"``
keeps the largest scores first (abundant data), ``order="easy"`` the smallest (scarce data):
the same word and values as SemDeDup's and DBP's ``order`` (hard = farthest from the centroid
first). Global ranking over all rows; ties go to the lower row index.
"""

from __future__ import annotations

import numpy as np
import torch

from prunecore.budget import keep_count, top_k_mask
from prunecore.cluster import Clustering, l2_normalize, row_centroid_similarity
from prunecore.rows import iter_row_batches

from ._clusters import check_embeddings, ensure_clustering
from .deprecation import renamed_function, warn_renamed
from .selection import Selection

REASONS = {"hard": "prototypical", "easy": "atypical"}  # order -> reason of the dropped rows


def ssp_scores(emb, clustering: Clustering) -> np.ndarray:
    """``1 - cos(x_i, own centroid)`` for emb (n, d): (n,) float32, in [0, 2]."""
    emb = check_embeddings(emb)
    return (1.0 - row_centroid_similarity(emb, clustering)).astype(np.float32)


def class_prototypes(emb, labels: np.ndarray, *, batch_size: int = 65536) -> Clustering:
    """Supervised-prototype variant: centroids are the unit class means of unit rows.

    emb: (n, d); labels: (n,) integer classes in [0, C). Returns a Clustering with C
    centroids (a class absent from ``labels`` raises, naming it).
    """
    emb = check_embeddings(emb)
    labels = np.asarray(labels)
    if labels.shape != (emb.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({emb.shape[0]},), got {labels.dtype} {labels.shape}")
    if labels.min() < 0:
        raise ValueError("labels must be non-negative class ids")
    n_classes = int(labels.max()) + 1
    sums = torch.zeros((n_classes, emb.shape[1]), dtype=torch.float64)
    for start, batch in iter_row_batches(emb, batch_size):
        unit = torch.from_numpy(l2_normalize(batch, row_ids=start)).double()
        sums.index_add_(0, torch.from_numpy(labels[start : start + unit.shape[0]]).long(), unit)
    empty = np.flatnonzero(np.bincount(labels, minlength=n_classes) == 0)
    if empty.size:
        raise ValueError(f"empty class(es) {empty.tolist()}: no rows carry these labels")
    centroids = l2_normalize(sums.float().numpy())
    proto = Clustering(
        centroids=centroids,
        labels=labels.astype(np.int64),
        sim=np.zeros(emb.shape[0], dtype=np.float32),
        params={"kind": "class_prototypes", "k": n_classes},
    )
    proto.sim = row_centroid_similarity(emb, proto)
    return proto


def ssp(
    emb,
    keep: float | int,
    *,
    k: int | None = None,
    order: str = "hard",
    seed: int = 1234,
    clustering: Clustering | None = None,
    labels: np.ndarray | None = None,
    device: str = "auto",
    mode: str | None = None,
) -> Selection:
    """Keep ``keep`` (fraction or count) of emb (n, d) by SSP score.

    Prototypes: ``clustering`` if given, else class means when ``labels`` (n,) are given
    (supervised variant), else k-means with ``k`` (required: the paper gives no k).
    ``order``: ``"hard"`` keeps the rows farthest from their prototype, ``"easy"`` the nearest.
    Dropped rows carry reason ``"prototypical"`` (hard) or ``"atypical"`` (easy).
    ``mode``: deprecated spelling of ``order`` (removed in the next release).
    """
    if mode is not None:
        warn_renamed("ssp(mode=...)", "order=...")
        order = mode
    emb = check_embeddings(emb)
    if order not in REASONS:
        raise ValueError(f"order must be one of {tuple(REASONS)}, got {order!r}")
    n_keep = keep_count(emb.shape[0], keep)
    if clustering is None and labels is not None:
        clustering = class_prototypes(emb, labels)
    clustering = ensure_clustering(emb, clustering, k, seed=seed, device=device)
    scores = ssp_scores(emb, clustering)
    mask = top_k_mask(scores, n_keep, largest=(order == "hard"))
    return Selection.from_mask(mask, REASONS[order], scores=scores)


prune_ssp = renamed_function(ssp, "prune_ssp")
