"""Token and context pruning at inference: FoPru, FTP, Provence, LocalLeap.

Names are resolved lazily so that importing :mod:`tokenprune` never pulls in transformers
or a model; each method lives in its own module.
"""

from prunecore.lazy import lazy_exports

_EXPORTS = {
    "fopru_scores": "tokenprune.fopru",
    "fopru_select": "tokenprune.fopru",
    "FoPru": "tokenprune.fopru",
    "localleap_transfer": "tokenprune.localleap.rules",
    "localleap_generate": "tokenprune.localleap.generate",
    "llada_topk": "tokenprune.localleap.rules",
    "fastdllm_threshold": "tokenprune.localleap.rules",
    "eb_sampler": "tokenprune.localleap.rules",
    "load_dllm": "tokenprune.localleap.models.loading",
    "provence_sentences": "tokenprune.provence.core",
    "ProvencePruner": "tokenprune.provence.model",
    "TokenStats": "tokenprune.stats",
    "ftp": "tokenprune.ftp",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
