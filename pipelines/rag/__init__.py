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

from typing import TYPE_CHECKING

from prunecore.lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _ADAPTERS, install_hint="pip install 'prunekit[rag]'")
