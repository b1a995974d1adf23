"""Deprecated spellings of the dataset-pruning API, kept for one release.

Each emits a ``DeprecationWarning`` naming the new spelling, then does what the new one does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from prunecore.deprecation import warn_renamed

__all__ = ["renamed_function", "warn_renamed"]


def renamed_function(new: Callable, old_name: str) -> Callable:
    """A deprecated alias ``old_name`` of ``new``: same arguments and result, one warning per call."""

    @functools.wraps(new)
    def alias(*args, **kwargs):
        warn_renamed(f"dataprune.{old_name}", f"dataprune.{new.__name__}")
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated alias of :func:`{new.__name__}` (removed in the next release)."
    return alias
