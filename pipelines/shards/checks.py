"""Option checks whose errors name the option (its CLI flag) and what it accepts; used by the
runner's :func:`~pipelines.shards.run.check_config` and by each selection step's ``check``."""

from __future__ import annotations

import math
import numbers

__all__ = ["in_range", "positive_int"]


def positive_int(name: str, value, minimum: int = 1) -> None:
    """Raise ``ValueError("NAME must be an integer >= MINIMUM, got ...")`` unless ``value`` is one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def in_range(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    """Raise ``ValueError("NAME must be a number in [lo, hi], got ...")`` (brackets per openness)
    unless ``value`` is a finite real number in that interval."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        brackets = ("(" if lo_open else "[") + f"{lo}, {hi}" + (")" if hi_open else "]")
        raise ValueError(f"{name} must be a number in {brackets}, got {value!r}")
