"""Token and context pruning at inference: FoPru, FTP, Provence, LocalLeap.

Names are resolved lazily so that importing :mod:`tokenprune` never pulls in transformers
or a model; each method lives in its own module. ``__all__`` lists the entry points,
``dir(tokenprune)`` shows them, and type checkers see them through the ``TYPE_CHECKING`` block.
"""

from typing import TYPE_CHECKING

from prunecore.lazy import lazy_dir, lazy_exports

if TYPE_CHECKING:
    from . import ftp
    from .fopru import FoPru, fopru_generate, fopru_scores, fopru_select
    from .ftp import attach_ftp
    from .generation import Generation
    from .localleap.generate import localleap_generate
    from .localleap.models.loading import load_dllm
    from .localleap.rules import eb_sampler, fastdllm_threshold, llada_topk, localleap_transfer
    from .provence.core import provence_sentences
    from .provence.model import ProvencePruner
    from .stats import TokenStats

_EXPORTS = {
    "fopru_generate": "tokenprune.fopru",
    "fopru_scores": "tokenprune.fopru",
    "fopru_select": "tokenprune.fopru",
    "FoPru": "tokenprune.fopru",
    "attach_ftp": "tokenprune.ftp",
    "localleap_transfer": "tokenprune.localleap.rules",
    "localleap_generate": "tokenprune.localleap.generate",
    "llada_topk": "tokenprune.localleap.rules",
    "fastdllm_threshold": "tokenprune.localleap.rules",
    "eb_sampler": "tokenprune.localleap.rules",
    "load_dllm": "tokenprune.localleap.models.loading",
    "provence_sentences": "tokenprune.provence.core",
    "ProvencePruner": "tokenprune.provence.model",
    "TokenStats": "tokenprune.stats",
    "Generation": "tokenprune.generation",
    "ftp": "tokenprune.ftp",
}

__all__ = [
    "FoPru",
    "Generation",
    "ProvencePruner",
    "TokenStats",
    "attach_ftp",
    "eb_sampler",
    "fastdllm_threshold",
    "fopru_generate",
    "fopru_scores",
    "fopru_select",
    "ftp",
    "llada_topk",
    "load_dllm",
    "localleap_generate",
    "localleap_transfer",
    "provence_sentences",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)
__dir__ = lazy_dir(globals(), _EXPORTS)
