"""Budgets and stable top-k, shared by every method of both halves.

The one budget rule: ``keep`` is a fraction in (0, 1] or an integer count. A fraction of
``n`` becomes ``K = floor(keep * n + 0.5)`` (round half up: keep=0.5 of n=5 gives 3), so
the same ``keep`` gives the same K in SemDeDup, DBP, SSP, FoPru, FTP and Provence. Ties in
every top-k go to the lower index.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def check_keep(keep: float | int) -> None:
    """Raise a clear error unless ``keep`` is a fraction in (0, 1] or a non-negative int."""
    if isinstance(keep, bool):
        raise TypeError("keep must be a fraction (float) or a count (int), not bool")
    if isinstance(keep, numbers.Integral):
        if keep < 0:
            raise ValueError(f"keep count must be >= 0, got {keep}")
        return
    if isinstance(keep, numbers.Real):
        if not (math.isfinite(float(keep)) and 0.0 < float(keep) <= 1.0):
            raise ValueError(f"keep fraction {keep} is outside (0, 1] (pass an int for a count)")
        return
    raise TypeError(f"keep must be a float fraction or an int count, got {type(keep).__name__}")


def keep_count(n: int, keep: float | int, *, minimum: int = 0, clamp: bool = False) -> int:
    """Number of items to keep out of ``n`` under the one budget rule.

    ``keep`` is a fraction in (0, 1] (``floor(keep * n + 0.5)``) or an integer count in
    [0, n]; a count above ``n`` raises, or keeps all ``n`` with ``clamp=True`` (a per-row
    budget "at most ``keep``", as token methods use it). ``minimum`` (e.g. 1 for token
    methods, where keeping nothing is meaningless) raises a ``ValueError`` naming the fix
    when the budget falls below it.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    check_keep(keep)
    if isinstance(keep, numbers.Integral):
        if keep > n and not clamp:
            raise ValueError(f"keep count {keep} is outside [0, n={n}] (pass clamp=True to keep at most n)")
        k = min(int(keep), int(n))
    else:
        k = int(math.floor(float(keep) * n + 0.5))
    if k < minimum:
        raise ValueError(
            f"keep={keep!r} of n={n} gives {k} < {minimum}; pass a larger fraction or an int count >= {minimum}"
        )
    return k


def keep_counts(n: torch.Tensor, keep: float | int, *, clamp: bool = False) -> torch.Tensor:
    """The budget rule per row: ``n`` (B,) integer counts -> (B,) long, same rules as :func:`keep_count`.

    A fraction is computed on ``n``'s device without a host sync. An int count above a row's
    ``n`` raises like :func:`keep_count` (one host read of ``n.min()``), or keeps that whole row
    with ``clamp=True`` (no host read).
    """
    check_keep(keep)
    if isinstance(keep, numbers.Integral):
        if not clamp and n.numel() and int(n.min()) < keep:
            raise ValueError(
                f"keep count {keep} is above a row count n={int(n.min())}; pass clamp=True to keep at most n"
            )
        return torch.clamp(n.long(), max=int(keep))
    return torch.floor(n.double() * float(keep) + 0.5).long()


def keep_from_sparsity(sparsity):
    """The one converter between the two spellings of a budget: ``keep = 1 - sparsity``.

    ``sparsity`` (the fraction dropped) is a float in [0, 1], a sequence or an array of them;
    the result has the same form (float, list, or float64 array). The map is its own inverse,
    so ``keep_from_sparsity(keep)`` gives the sparsity of a keep fraction. Counts (ints) are
    refused: a count has no sparsity.
    """
    values = np.asarray(sparsity.detach().cpu() if hasattr(sparsity, "detach") else sparsity, dtype=object)
    for v in values.reshape(-1):
        if isinstance(v, bool | np.bool_ | numbers.Integral):
            raise TypeError(f"a sparsity is a fraction in [0, 1], got the count {v!r}")
        if not (isinstance(v, numbers.Real) and 0.0 <= float(v) <= 1.0):
            raise ValueError(f"sparsity {v!r} is outside [0, 1] (keep = 1 - sparsity)")
    if values.ndim == 0:
        return 1.0 - float(sparsity)
    flipped = 1.0 - values.astype(np.float64)
    return flipped.tolist() if isinstance(sparsity, (list, tuple)) else flipped


def rank_order(scores: np.ndarray, *, descending: bool = True) -> np.ndarray:
    """Indices that sort ``scores`` (n,), ties broken by ascending index (stable)."""
    scores = np.asarray(scores)
    key = -scores if descending else scores
    return np.argsort(key, kind="stable")


def top_k_mask(scores: np.ndarray, k: int, *, largest: bool = True) -> np.ndarray:
    """Boolean mask (n,) of the ``k`` largest (or smallest) scores; ties go to lower indices."""
    scores = np.asarray(scores)
    if not 0 <= k <= scores.shape[0]:
        raise ValueError(f"k={k} outside [0, {scores.shape[0]}]")
    mask = np.zeros(scores.shape[0], dtype=bool)
    mask[rank_order(scores, descending=largest)[:k]] = True
    return mask


def torch_rank(scores: torch.Tensor, *, descending: bool = True) -> torch.Tensor:
    """Rank of every entry along the last dim (0 = best), ties to the lower index.

    ``scores`` (..., n) -> long (..., n); ``rank < k`` is the stable top-k mask.
    """
    order = torch.sort(scores, dim=-1, descending=descending, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank


def torch_top_k(scores: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """Indices (..., k) of the ``k`` best entries along the last dim, sorted ascending.

    Stable: among equal scores the lower index wins (``torch.topk`` does not promise that).
    """
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} outside [0, {scores.shape[-1]}]")
    order = torch.sort(scores, dim=-1, descending=largest, stable=True).indices[..., :k]
    return order.sort(dim=-1).values
