"""Uniform random subsets (the baseline that KD makes strong)."""

from __future__ import annotations

import numpy as np

from prunecore.budget import keep_count

from .selection import Selection


def random_subset(n: int, keep: float | int, *, seed: int) -> Selection:
    """Keep a seeded uniform random ``keep`` (fraction or count) of ``n`` rows.

    Dropped rows carry reason ``"random"``; the score is the row's random draw in [0, 1).
    """
    n_keep = keep_count(n, keep)
    draws = np.random.default_rng(seed).random(n)
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(draws, kind="stable")[:n_keep]] = True
    return Selection.from_mask(mask, "random", scores=draws.astype(np.float32))
