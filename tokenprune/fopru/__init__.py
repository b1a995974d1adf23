"""FoPru: focal pruning of an LVLM's visual tokens from its vision encoder's attention.

* :mod:`.core` — the math (scores, selection, any-res/merged-grid mappings, prompt compaction);
* :mod:`.capture` — hooks that recompute the needed attention rows under any attention kernel;
* :mod:`.adapters` — one registered module per model family (``config.model_type``);
* :mod:`.api` — :func:`fopru_generate` and the :class:`FoPru` context manager.

Importing this package loads no transformers (family modules import it inside functions).
"""

from .api import FoPru, fopru_generate
from .core import fopru_scores, fopru_select, merge_grid_scores

__all__ = ["FoPru", "fopru_generate", "fopru_scores", "fopru_select", "merge_grid_scores"]
