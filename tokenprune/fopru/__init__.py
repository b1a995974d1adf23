"""FoPru: focal pruning of an LVLM's visual tokens from its vision encoder's attention.

* :mod:`.core` — the math (scores, selection, any-res/merged-grid mappings, prompt compaction);
* :mod:`.capture` — hooks that recompute the needed attention rows under any attention kernel;
* :mod:`.adapters` — one registered module per model family (``config.model_type``);
* :mod:`.api` — :func:`fopru_generate` and the :class:`FoPru` context manager.

Importing this package loads no transformers; the model side (``FoPru``, ``fopru_generate``)
loads on first use and needs ``transformers>=`` :data:`tokenprune.fopru.adapters.MIN_TRANSFORMERS`.
"""

from importlib import import_module

from .core import fopru_scores, fopru_select, merge_grid_scores

__all__ = ["FoPru", "fopru_generate", "fopru_scores", "fopru_select", "merge_grid_scores"]


def __getattr__(name):
    if name in ("FoPru", "fopru_generate"):
        return getattr(import_module("tokenprune.fopru.api"), name)
    raise AttributeError(f"module 'tokenprune.fopru' has no attribute {name!r}")
