"""Drop-in Provence context pruning + reranking for RAG frameworks (extra ``prunekit[rag]``).

* LangChain: :class:`~pipelines.rag.langchain.ProvenceCompressor` (a ``BaseDocumentCompressor``;
  use it inside ``ContextualCompressionRetriever``);
* LlamaIndex: :class:`~pipelines.rag.llamaindex.ProvencePostprocessor` (a ``BaseNodePostprocessor``);
* Haystack: :class:`~pipelines.rag.haystack.ProvenceRanker` (a component with ``run`` /
  ``run_async``).

The framework-free core is :mod:`pipelines.rag.core` (:func:`prune_texts`). Each adapter lives
in its framework's module; the three names are resolved here on first access, so importing
``pipelines.rag`` imports no framework.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .core import DEFAULTS, ProvenceSettings, prune_texts

if TYPE_CHECKING:
    from .haystack import ProvenceRanker
    from .langchain import ProvenceCompressor
    from .llamaindex import ProvencePostprocessor

__all__ = [
    "DEFAULTS",
    "ProvenceCompressor",
    "ProvencePostprocessor",
    "ProvenceRanker",
    "ProvenceSettings",
    "prune_texts",
]

_ADAPTERS = {
    "ProvenceCompressor": "pipelines.rag.langchain",
    "ProvencePostprocessor": "pipelines.rag.llamaindex",
    "ProvenceRanker": "pipelines.rag.haystack",
}


def __getattr__(name: str):
    if name not in _ADAPTERS:
        raise AttributeError(f"module 'pipelines.rag' has no attribute {name!r}")
    try:
        module = import_module(_ADAPTERS[name])
    except ImportError as exc:
        raise ImportError(f"{name} needs its framework installed: pip install 'prunekit[rag]' ({exc})") from exc
    return getattr(module, name)
