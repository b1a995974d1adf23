"""Drop-in Provence context pruning + reranking for RAG frameworks (extra ``prunekit[rag]``).

* LangChain: :class:`ProvenceCompressor` (a ``BaseDocumentCompressor``; use it inside
  ``ContextualCompressionRetriever``);
* LlamaIndex: :class:`ProvencePostprocessor` (a ``BaseNodePostprocessor``);
* Haystack 2: :class:`ProvenceRanker` (a ``@component`` with ``run(documents, query)``).

Each wraps a :class:`tokenprune.provence_model.ProvencePruner` (or a model folder / cached hub
id, loaded on first use). Every returned document carries its reranking score (LangChain
metadata ``reranking_score``, LlamaIndex ``NodeWithScore.score``, Haystack ``Document.score``)
and ``provence_compression`` / ``provence_kept_sentences`` in its metadata. With
``reorder=True`` documents are sorted by score (descending) and cut to ``top_k``; with
``drop_empty=True`` (default) documents pruned to nothing are removed.

The framework classes are built on first access, so importing this module does not import
LangChain, LlamaIndex or Haystack.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["ProvenceCompressor", "ProvencePostprocessor", "ProvenceRanker", "prune_texts"]


def _as_pruner(pruner):
    from tokenprune.provence_model import ProvencePruner

    if isinstance(pruner, ProvencePruner):
        return pruner
    return ProvencePruner(pruner)


def prune_texts(
    pruner,
    query: str,
    texts: list[str],
    *,
    threshold: float = 0.1,
    title="first_sentence",
    always_select_title: bool = False,
    reorder: bool = False,
    top_k: int | None = None,
    drop_empty: bool = True,
    batch_size: int = 32,
) -> list[dict]:
    """Prune ``texts`` for ``query``; the framework-independent core of the adapters.

    Returns one dict per surviving text (``index`` into ``texts``, ``pruned_context``,
    ``reranking_score``, ``compression``, ``kept_sentences``), in input order, or by score
    descending with ``reorder=True``; ``top_k`` (if given) keeps the first ``top_k``.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if not texts:
        return []
    out = pruner.process(
        query,
        list(texts),
        title=title,
        threshold=threshold,
        always_select_title=always_select_title,
        batch_size=batch_size,
    )
    rows = [
        {
            "index": i,
            "pruned_context": out["pruned_context"][i],
            "reranking_score": out["reranking_score"][i],
            "compression": out["compression"][i],
            "kept_sentences": out["kept_sentences"][i],
        }
        for i in range(len(texts))
    ]
    if drop_empty:
        rows = [r for r in rows if r["pruned_context"].strip()]
    if reorder:
        rows.sort(key=lambda r: -r["reranking_score"])
    if top_k is not None:
        rows = rows[: int(top_k)]
    return rows


def _meta(row: dict) -> dict:
    return {
        "reranking_score": row["reranking_score"],
        "provence_compression": row["compression"],
        "provence_kept_sentences": list(row["kept_sentences"]),
    }


@functools.cache
def _langchain_class():
    from collections.abc import Sequence

    from langchain_core.documents import BaseDocumentCompressor, Document
    from pydantic import ConfigDict

    class ProvenceCompressor(BaseDocumentCompressor):
        """LangChain document compressor: Provence pruning + reranking.

        Example::

            from langchain_classic.retrievers import ContextualCompressionRetriever
            retriever = ContextualCompressionRetriever(
                base_compressor=ProvenceCompressor(pruner="path/to/provence"),
                base_retriever=vectorstore.as_retriever())
        """

        model_config = ConfigDict(arbitrary_types_allowed=True)
        pruner: Any
        threshold: float = 0.1
        title: Any = "first_sentence"
        always_select_title: bool = False
        reorder: bool = False
        top_k: int | None = None
        drop_empty: bool = True
        batch_size: int = 32

        def model_post_init(self, __context: Any) -> None:
            object.__setattr__(self, "pruner", _as_pruner(self.pruner))

        def compress_documents(self, documents: Sequence[Document], query: str, callbacks=None) -> Sequence[Document]:
            docs = list(documents)
            rows = prune_texts(
                self.pruner,
                query,
                [d.page_content for d in docs],
                threshold=self.threshold,
                title=self.title,
                always_select_title=self.always_select_title,
                reorder=self.reorder,
                top_k=self.top_k,
                drop_empty=self.drop_empty,
                batch_size=self.batch_size,
            )
            return [
                Document(
                    page_content=r["pruned_context"],
                    id=docs[r["index"]].id,
                    metadata={**docs[r["index"]].metadata, **_meta(r)},
                )
                for r in rows
            ]

    return ProvenceCompressor


@functools.cache
def _llamaindex_class():

    from llama_index.core.bridge.pydantic import ConfigDict, Field
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import NodeWithScore, QueryBundle

    class ProvencePostprocessor(BaseNodePostprocessor):
        """LlamaIndex node postprocessor: Provence pruning; the node score becomes the
        reranking score."""

        model_config = ConfigDict(arbitrary_types_allowed=True)
        pruner: Any = Field(description="ProvencePruner or a model path")
        threshold: float = 0.1
        title: Any = "first_sentence"
        always_select_title: bool = False
        reorder: bool = False
        top_k: int | None = None
        drop_empty: bool = True
        batch_size: int = 32

        def model_post_init(self, __context: Any) -> None:
            object.__setattr__(self, "pruner", _as_pruner(self.pruner))

        @classmethod
        def class_name(cls) -> str:
            return "ProvencePostprocessor"

        def _postprocess_nodes(
            self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
        ) -> list[NodeWithScore]:
            if query_bundle is None:
                raise ValueError("ProvencePostprocessor needs a query (query_bundle or query_str)")
            rows = prune_texts(
                self.pruner,
                query_bundle.query_str,
                [n.node.get_content() for n in nodes],
                threshold=self.threshold,
                title=self.title,
                always_select_title=self.always_select_title,
                reorder=self.reorder,
                top_k=self.top_k,
                drop_empty=self.drop_empty,
                batch_size=self.batch_size,
            )
            out = []
            for r in rows:
                node = nodes[r["index"]].node.model_copy(deep=True)
                node.set_content(r["pruned_context"])
                node.metadata.update(_meta(r))
                out.append(NodeWithScore(node=node, score=r["reranking_score"]))
            return out

    return ProvencePostprocessor


@functools.cache
def _haystack_class():
    from dataclasses import replace

    from haystack import Document, component

    @component
    class ProvenceRanker:
        """Haystack 2 component: prune documents for a query and score them with Provence.

        ``pruner`` is a ProvencePruner or a model folder / cached hub id (loaded in
        ``warm_up()`` or on first ``run``).
        """

        def __init__(
            self,
            pruner: Any,
            threshold: float = 0.1,
            title: Any = "first_sentence",
            always_select_title: bool = False,
            reorder: bool = True,
            top_k: int | None = None,
            drop_empty: bool = True,
            batch_size: int = 32,
        ):
            self.pruner = pruner
            self.threshold = threshold
            self.title = title
            self.always_select_title = always_select_title
            self.reorder = reorder
            self.top_k = top_k
            self.drop_empty = drop_empty
            self.batch_size = batch_size

        def warm_up(self):
            self.pruner = _as_pruner(self.pruner)

        @component.output_types(documents=list[Document])
        def run(self, documents: list[Document], query: str, top_k: int | None = None, threshold: float | None = None):
            self.warm_up()
            docs = list(documents)
            rows = prune_texts(
                self.pruner,
                query,
                [d.content or "" for d in docs],
                threshold=self.threshold if threshold is None else threshold,
                title=self.title,
                always_select_title=self.always_select_title,
                reorder=self.reorder,
                top_k=self.top_k if top_k is None else top_k,
                drop_empty=self.drop_empty,
                batch_size=self.batch_size,
            )
            return {
                "documents": [
                    replace(
                        docs[r["index"]],
                        content=r["pruned_context"],
                        score=r["reranking_score"],
                        meta={**docs[r["index"]].meta, **_meta(r)},
                    )
                    for r in rows
                ]
            }

    return ProvenceRanker


_BUILDERS = {
    "ProvenceCompressor": _langchain_class,
    "ProvencePostprocessor": _llamaindex_class,
    "ProvenceRanker": _haystack_class,
}


def __getattr__(name):
    if name in _BUILDERS:
        try:
            return _BUILDERS[name]()
        except ImportError as exc:
            raise ImportError(f"{name} needs its framework installed: pip install 'prunekit[rag]' ({exc})") from exc
    raise AttributeError(f"module 'pipelines.rag' has no attribute {name!r}")
