"""Per-block budgets of FTP: ``keep`` first (a fraction or an int count per row), sparsity as its alias.

Every conversion goes through :func:`prunecore.budget.keep_from_sparsity` and every keep value
through :func:`prunecore.budget.check_keep`, so a bad budget gives the same error as in the
other methods. The router's sparsity feature of a fraction block is ``1 - keep``; a count
block has no single sparsity (the router sees each row's ``1 - min(k, n) / n``).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from prunecore.budget import check_keep, keep_from_sparsity


def validate_schedule(schedule, n_layers: int, *, allow_full: bool = False) -> list[float]:
    """Per-block target sparsities as a list of floats.

    Args:
        schedule: a float (uniform) or a sequence of ``n_layers`` floats.
        n_layers: number of decoder layers.
        allow_full: accept 1.0 (whole block removed; used by the ShortGPT baseline).
    Raises:
        ValueError: wrong length, NaN, or a value outside [0, 1) ([0, 1] with allow_full).
    """
    if isinstance(schedule, torch.Tensor):
        schedule = schedule.detach().cpu().tolist()
    if isinstance(schedule, (int, float)):
        schedule = [float(schedule)] * n_layers
    try:
        values = [float(x) for x in schedule]
    except TypeError as e:
        raise TypeError(f"schedule must be a float or a sequence of floats, got {type(schedule)}") from e
    if len(values) != n_layers:
        raise ValueError(f"schedule has {len(values)} entries but the model has {n_layers} decoder layers")
    hi_ok = (lambda v: v <= 1.0) if allow_full else (lambda v: v < 1.0)
    for i, v in enumerate(values):
        if v != v or v < 0.0 or not hi_ok(v):
            rng = "[0, 1]" if allow_full else "[0, 1)"
            raise ValueError(f"schedule[{i}] = {v} is outside {rng}: a sparsity is a fraction of tokens skipped")
    return values


def per_block(values, n_layers: int, name: str) -> list:
    """A scalar (uniform) or a sequence / array / tensor of ``n_layers`` values as a list (ints stay ints)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    if np.ndim(values) == 0:
        return [values.item() if hasattr(values, "item") else values] * n_layers
    out = np.asarray(values, dtype=object).reshape(-1).tolist() if not isinstance(values, list) else list(values)
    out = [v.item() if hasattr(v, "item") else v for v in out]
    if len(out) != n_layers:
        raise ValueError(f"{name} has {len(out)} entries but the model has {n_layers} decoder layers")
    return out


def block_budgets(keep, n_layers: int, *, sparsity=None, allow_full: bool = False) -> tuple[list, list]:
    """Per-block ``(sparsities, keeps)`` from ``keep`` or its alias ``sparsity`` (``schedule=``).

    Args:
        keep: fraction of tokens each block computes (in (0, 1]; 0 allowed with ``allow_full``)
            or an int count of each row's tokens (at most that many, clamped to the row); a
            scalar is uniform, a sequence gives one value per block.
        n_layers: number of decoder layers.
        sparsity: the alias, ``keep = 1 - sparsity`` (validated by :func:`validate_schedule`).
        allow_full: accept a block removed entirely (keep 0.0 / sparsity 1.0).
    Returns:
        ``(sparsities, keeps)``: the router's sparsity feature per block (None for a count
        block) and the budgets (floats or ints), each of length ``n_layers``.
    """
    if keep is not None and sparsity is not None:
        raise ValueError("pass keep or its alias schedule= (a sparsity), not both (keep = 1 - sparsity)")
    if keep is None:
        if sparsity is None:
            raise ValueError(
                "give keep (fraction of tokens each block computes, or an int count per row) "
                "or its alias schedule= (sparsity)"
            )
        sparsities = validate_schedule(sparsity, n_layers, allow_full=allow_full)
        return sparsities, [keep_from_sparsity(s) for s in sparsities]
    keeps = per_block(keep, n_layers, "keep")
    for v in keeps:
        removed = allow_full and isinstance(v, float) and v == 0.0
        if not removed:
            check_keep(v)
    counts = [isinstance(v, numbers.Integral) for v in keeps]
    return [None if c else keep_from_sparsity(float(v)) for v, c in zip(keeps, counts)], [
        v if c else float(v) for v, c in zip(keeps, counts)
    ]
