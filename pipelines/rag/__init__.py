"""Drop-in Provence context pruning + reranking for RAG frameworks (extra ``prunekit[rag]``).

* LangChain: :class:`~pipelines.rag.langchain.ProvenceCompressor` (a ``BaseDocumentCompressor``;
  use it inside ``ContextualCompressionRetriever``);
* LlamaIndex: :class:`~pipelines.rag.llamaindex.ProvencePostprocessor` (a ``BaseNodePostprocessor``);
* Haystack: :class:`~pipelines.rag.haystack.ProvenceRanker` (a component with ``run`` /
  ``run_async``).

The framework-free core is :mod:`pipelines.rag.core` (:func:`prune_texts`). Each adapter lives
in its framework's module and is filed lazily in :data:`ADAPTERS` (a :class:`prunecore.Registry`
keyed by framework): the three names are resolved here on first access, so importing
``pipelines.rag`` imports no framework. A new framework is one module and one
``ADAPTERS.register_lazy`` line below.
"""

from typing import TYPE_CHECKING

from prunecore.lazy import lazy_exports
from prunecore.registry import Registry

from .core import DEFAULTS, ProvenceSettings, prune_texts

if TYPE_CHECKING:
    from .haystack import ProvenceRanker
    from .langchain import ProvenceCompressor
    from .llamaindex import ProvencePostprocessor

__all__ = [
    "ADAPTERS",
    "DEFAULTS",
    "ProvenceCompressor",
    "ProvencePostprocessor",
    "ProvenceRanker",
    "ProvenceSettings",
    "prune_texts",
]

#: framework -> its adapter class, imported on first lookup
ADAPTERS: Registry[type] = Registry("RAG framework adapter")
ADAPTERS.register_lazy("langchain", "pipelines.rag.langchain:ProvenceCompressor")
ADAPTERS.register_lazy("llamaindex", "pipelines.rag.llamaindex:ProvencePostprocessor")
ADAPTERS.register_lazy("haystack", "pipelines.rag.haystack:ProvenceRanker")

__getattr__ = lazy_exports(__name__, ADAPTERS.export_table(), install_hint="pip install 'prunekit[rag]'")
