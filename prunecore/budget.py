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


def keep_count(n: int, keep: float | int, *, minimum: int = 0) -> int:
    """Number of items to keep out of ``n`` under the one budget rule.

    ``keep`` is a fraction in (0, 1] (``floor(keep * n + 0.5)``) or an integer count in
    [0, n]. ``minimum`` (e.g. 1 for token methods, where keeping nothing is meaningless)
    raises a ``ValueError`` naming the fix when the budget falls below it.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    check_keep(keep)
    if isinstance(keep, numbers.Integral):
        if keep > n:
            raise ValueError(f"keep count {keep} is outside [0, n={n}]")
        k = int(keep)
    else:
        k = int(math.floor(float(keep) * n + 0.5))
    if k < minimum:
        raise ValueError(
            f"keep={keep!r} of n={n} gives {k} < {minimum}; pass a larger fraction or an int count >= {minimum}"
        )
    return k


def keep_counts(n: torch.Tensor, keep: float) -> torch.Tensor:
    """The budget rule per row: ``n`` (B,) integer counts, ``keep`` a fraction -> (B,) long.

    Same rounding as :func:`keep_count`, computed on ``n``'s device without a host sync.
    """
    check_keep(keep)
    if isinstance(keep, numbers.Integral):
        return torch.minimum(n.long(), torch.full_like(n.long(), int(keep)))
    return torch.floor(n.double() * float(keep) + 0.5).long()


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
