"""Where prunekit meets its users: shard filtering, generate wrappers, RAG components.

The entry points below resolve lazily (importing :mod:`pipelines` loads no model, faiss or
framework code); ``__all__`` lists them, ``dir(pipelines)`` shows them, and type checkers see
them through the ``TYPE_CHECKING`` block.
"""

from typing import TYPE_CHECKING

from prunecore.lazy import lazy_dir, lazy_exports

if TYPE_CHECKING:
    from tokenprune.fopru import FoPru, fopru_generate

    from .generate_dllm import DiffusionGeneration, dllm_generate
    from .generate_llm import ftp_generate
    from .rag import ProvenceCompressor, ProvencePostprocessor, ProvenceRanker, ProvenceSettings, prune_texts
    from .shards import STEPS, FilterConfig, FilterResult, default_steps, register_step, run_filter
    from .shards.report import write_report

_EXPORTS = {
    "run_filter": "pipelines.shards",
    "FilterConfig": "pipelines.shards",
    "FilterResult": "pipelines.shards",
    "default_steps": "pipelines.shards",
    "STEPS": "pipelines.shards",
    "register_step": "pipelines.shards",
    "write_report": "pipelines.shards.report",
    "FoPru": "tokenprune.fopru",
    "fopru_generate": "tokenprune.fopru",
    "ftp_generate": "pipelines.generate_llm",
    "dllm_generate": "pipelines.generate_dllm",
    "DiffusionGeneration": "pipelines.generate_dllm",
    "prune_texts": "pipelines.rag",
    "ProvenceSettings": "pipelines.rag",
    "ProvenceCompressor": "pipelines.rag",
    "ProvencePostprocessor": "pipelines.rag",
    "ProvenceRanker": "pipelines.rag",
}

__all__ = [
    "DiffusionGeneration",
    "FilterConfig",
    "FilterResult",
    "FoPru",
    "ProvenceCompressor",
    "ProvencePostprocessor",
    "ProvenceRanker",
    "ProvenceSettings",
    "STEPS",
    "default_steps",
    "dllm_generate",
    "fopru_generate",
    "ftp_generate",
    "prune_texts",
    "register_step",
    "run_filter",
    "write_report",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)
__dir__ = lazy_dir(globals(), _EXPORTS)
