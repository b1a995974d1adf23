"""Budgets and top-k selection shared by the data- and token-pruning halves."""
from __future__ import annotations

import numbers

import numpy as np


def keep_count(n: int, keep: float | int) -> int:
    """Number of rows to keep out of ``n``.

    ``keep`` is either a fraction in (0, 1] (a Python/numpy float; rounded half up) or an
    integer count in [0, n]. Booleans are rejected to avoid ``True`` meaning "1 row".
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(keep, bool):
        raise TypeError("keep must be a fraction (float) or a count (int), not bool")
    if isinstance(keep, numbers.Integral):
        if not 0 <= keep <= n:
            raise ValueError(f"keep count {keep} is outside [0, n={n}]")
        return int(keep)
    if isinstance(keep, numbers.Real):
        keep = float(keep)
        if not (0.0 < keep <= 1.0):
            raise ValueError(f"keep fraction {keep} is outside (0, 1]")
        return int(np.floor(keep * n + 0.5))
    raise TypeError(f"keep must be a float fraction or an int count, got {type(keep).__name__}")


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
