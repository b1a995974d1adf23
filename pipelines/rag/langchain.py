"""LangChain adapter: :class:`ProvenceCompressor`, a ``BaseDocumentCompressor``.

Importing this module imports ``langchain_core``. Use the compressor inside a
``ContextualCompressionRetriever`` (package ``langchain-classic``)::

    from langchain_classic.retrievers import ContextualCompressionRetriever

    retriever = ContextualCompressionRetriever(
        base_compressor=ProvenceCompressor(pruner="path/to/provence"), base_retriever=store.as_retriever()
    )
"""

from collections.abc import Sequence

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document

from .core import provence_metadata
from .fields import ProvenceFields

__all__ = ["ProvenceCompressor"]


class ProvenceCompressor(ProvenceFields, BaseDocumentCompressor):
    """Provence context pruning + reranking as a LangChain document compressor.

    Every returned document is a copy whose ``page_content`` is the pruned text (exact
    sentences of the original) and whose metadata gains ``reranking_score``,
    ``provence_compression`` and ``provence_kept_sentences``. The compressor pickles (the
    pruner is pickled with it) and serialises its pruner as the folder it was loaded from.
    """

    def translate(self, documents: Sequence[Document], rows: list[dict]) -> list[Document]:
        """Rows of :meth:`prune` -> pruned copies of the input documents."""
        return [
            Document(
                page_content=r["pruned_context"],
                id=documents[r["index"]].id,
                metadata={**documents[r["index"]].metadata, **provence_metadata(r)},
            )
            for r in rows
        ]

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        docs = list(documents)
        return self.translate(docs, self.prune(query, [d.page_content for d in docs]))

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        docs = list(documents)
        return self.translate(docs, await self.aprune(query, [d.page_content for d in docs]))
