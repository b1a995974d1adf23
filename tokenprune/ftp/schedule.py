"""Search of per-block sparsity schedules under a global target (FTP's scheduler).

(paper) a genetic algorithm over per-block sparsity vectors whose mean equals the global
target, fitness = calibration loss with the static router; after router training the schedule
is refined with the trained router. Population size, generations, tournament selection,
blend crossover, Gaussian mutation, elitism and the per-block bounds are parameters
(reconstruction). Everything is seeded; the fitness function is the caller's (lower = better).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from prunecore.budget import check_keep, keep_from_sparsity


def project_to_mean(x: np.ndarray, target: float, lo: float = 0.0, hi: float = 0.9, iters: int = 60) -> np.ndarray:
    """Project rows onto ``{v : mean(v) = target, lo <= v <= hi}`` by a common shift.

    Finds per row the shift ``tau`` with ``mean(clip(x + tau, lo, hi)) = target`` (bisection;
    this is the Euclidean projection onto the box-constrained hyperplane).

    Args:
        x: (P, L) or (L,) float.
    Returns:
        same shape, float64.
    """
    if not lo <= target <= hi:
        raise ValueError(f"target {target} outside the per-block bounds [{lo}, {hi}]")
    a = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if not np.isfinite(a).all():
        raise ValueError("schedule candidates contain NaN/inf")
    t_lo = (lo - a.max(1))[:, None] - 1e-9
    t_hi = (hi - a.min(1))[:, None] + 1e-9
    for _ in range(iters):
        mid = 0.5 * (t_lo + t_hi)
        m = np.clip(a + mid, lo, hi).mean(1, keepdims=True)
        below = m < target
        t_lo = np.where(below, mid, t_lo)
        t_hi = np.where(below, t_hi, mid)
    out = np.clip(a + 0.5 * (t_lo + t_hi), lo, hi)
    # remove the residual of the bisection exactly on the free coordinates
    resid = target - out.mean(1, keepdims=True)
    free = (out > lo) & (out < hi)
    nfree = free.sum(1, keepdims=True)
    out = np.where(free, out + resid * a.shape[1] / np.maximum(nfree, 1), out)
    out = np.clip(out, lo, hi)
    return out if np.ndim(x) == 2 else out[0]


def search_schedule(
    fitness: Callable[[np.ndarray], float],
    n_layers: int,
    keep: float | None = None,
    *,
    target: float | None = None,
    population: int = 16,
    generations: int = 10,
    mutation_rate: float = 0.3,
    mutation_scale: float = 0.08,
    crossover_rate: float = 0.7,
    elite: int = 2,
    tournament: int = 3,
    bounds: tuple[float, float] | None = None,
    init=None,
    init_scale: float | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "FTP schedule GA",
):
    """Genetic search of a per-block schedule with ``mean == keep`` (or ``mean == target``).

    Args:
        fitness: ``schedule (L,) float64 -> loss`` (lower is better); called once per distinct
            candidate (results are memoised). With ``keep=`` the schedules it receives and the
            one returned are per-block keep fractions, otherwise sparsities.
        n_layers: L.
        keep: global target keep fraction (mean of the keep schedule); give this or ``target``.
        target: keyword alias, the global target sparsity (mean of a sparsity schedule;
            ``keep = 1 - target``); the schedules are then sparsities.
        population, generations, mutation_rate (per gene), mutation_scale (Gaussian std),
        crossover_rate, elite (kept unchanged), tournament (selection size): GA parameters.
        bounds: per-block (lo, hi) in the schedule's unit (default sparsity (0, 0.9), keep (0.1, 1)).
        init: optional (L,) schedule placed in the first population (refinement); the rest of
            the population is sampled around it (or around the uniform schedule).
        init_scale: std of the initial perturbations (default ``2 * mutation_scale``).
        seed: RNG seed; the search is deterministic for a seed and a deterministic fitness.
    Returns:
        ``(schedule (L,) float64, history)``; history is a list of per-generation dicts
        ``{"generation", "best", "mean", "best_schedule"}`` (generation 0 = initial population).
    """
    if keep is not None:
        if target is not None:
            raise ValueError("pass keep= or its alias target= (a sparsity), not both (keep = 1 - sparsity)")
        lo_k, hi_k = (0.1, 1.0) if bounds is None else map(float, bounds)
        check_keep(keep)
        sparse, hist = search_schedule(
            lambda s: fitness(keep_from_sparsity(s)),
            n_layers,
            target=keep_from_sparsity(float(keep)),
            population=population,
            generations=generations,
            mutation_rate=mutation_rate,
            mutation_scale=mutation_scale,
            crossover_rate=crossover_rate,
            elite=elite,
            tournament=tournament,
            bounds=(keep_from_sparsity(hi_k), keep_from_sparsity(lo_k)),
            init=None if init is None else keep_from_sparsity(np.asarray(init, dtype=np.float64)),
            init_scale=init_scale,
            seed=seed,
            progress=progress,
            desc=desc,
        )
        hist = [h | {"best_schedule": keep_from_sparsity(h["best_schedule"])} for h in hist]
        return keep_from_sparsity(sparse), hist
    if target is None:
        raise ValueError("give keep= (mean keep fraction) or target= (mean sparsity)")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    lo, hi = (0.0, 0.9) if bounds is None else map(float, bounds)
    if not 0.0 <= lo <= target <= hi <= 1.0:
        raise ValueError(f"need 0 <= lo <= target <= hi <= 1, got bounds {bounds} and target {target}")
    if population < 2 or generations < 0 or not 0 <= elite < population or tournament < 1:
        raise ValueError("need population >= 2, generations >= 0, 0 <= elite < population, tournament >= 1")
    rng = np.random.default_rng(seed)
    center = np.full(n_layers, float(target)) if init is None else np.asarray(init, dtype=np.float64)
    if center.shape != (n_layers,):
        raise ValueError(f"init must have shape ({n_layers},), got {center.shape}")
    scale = 2 * mutation_scale if init_scale is None else init_scale
    pop = center[None] + rng.normal(0.0, scale, size=(population, n_layers))
    pop[0] = center
    if init is not None and population > 1:
        pop[1] = target
    pop = project_to_mean(pop, target, lo, hi)
    cache: dict = {}

    def score(v):
        key = tuple(np.round(v, 6))
        if key not in cache:
            cache[key] = float(fitness(np.asarray(key)))
        return cache[key]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=generations + 1, desc=desc, leave=False)
    history = []
    fit = np.array([score(v) for v in pop])

    def log(g):
        b = int(np.argmin(fit))
        history.append(
            {"generation": g, "best": float(fit[b]), "mean": float(fit.mean()), "best_schedule": pop[b].tolist()}
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{fit[b]:.4f}")

    log(0)
    for g in range(1, generations + 1):
        order = np.argsort(fit, kind="stable")
        new = [pop[i] for i in order[:elite]]
        n_child = population - elite
        # tournament selection of parent pairs
        cand = rng.integers(0, population, size=(n_child, 2, tournament))
        winners = np.take_along_axis(cand, np.argmin(fit[cand], axis=2)[..., None], 2)[..., 0]
        pa, pb = pop[winners[:, 0]], pop[winners[:, 1]]
        do_x = rng.random(n_child) < crossover_rate
        alpha = rng.random((n_child, n_layers))
        child = np.where(do_x[:, None], alpha * pa + (1 - alpha) * pb, pa)
        mut = rng.random((n_child, n_layers)) < mutation_rate
        child = child + mut * rng.normal(0.0, mutation_scale, size=child.shape)
        child = project_to_mean(child, target, lo, hi)
        pop = np.concatenate([np.stack(new), child]) if elite else child
        fit = np.array([score(v) for v in pop])
        log(g)
    if bar is not None:
        bar.close()
    b = int(np.argmin(fit))
    return pop[b].copy(), history


def uniform_schedule(n_layers: int, keep: float | int | None = None, *, target: float | None = None) -> np.ndarray:
    """(L,) keep schedule with every block at ``keep``; always keep values, ready for ``attach_ftp``.

    Args:
        n_layers: L.
        keep: the keep fraction (or int count per row) of every block.
        target: deprecated alias, a sparsity converted with
            :func:`prunecore.budget.keep_from_sparsity` (the result is still keep fractions).
    """
    if target is not None:
        if keep is not None:
            raise ValueError("pass keep or its alias target= (a sparsity), not both (keep = 1 - sparsity)")
        warnings.warn(
            "uniform_schedule(target=) is deprecated: pass keep=1 - target (the result is keep fractions)",
            DeprecationWarning,
            stacklevel=2,
        )
        keep = keep_from_sparsity(target)
    if keep is None:
        raise ValueError("give keep (the keep fraction of every block)")
    check_keep(keep)
    return np.full(n_layers, keep)
