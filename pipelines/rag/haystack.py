"""Haystack adapter: :class:`ProvenceRanker`, a component with ``run`` and ``run_async``.

Importing this module imports ``haystack``. The module deliberately has no
``from __future__ import annotations``: Haystack reads the sockets' types from the live
annotations, so ``pipe.connect("retriever.documents", "provence.documents")`` type-checks::

    pipe.add_component("provence", ProvenceRanker(pruner="path/to/provence"))
    pipe.connect("retriever.documents", "provence.documents")
"""

import dataclasses
from dataclasses import replace
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict

from .core import (
    DEFAULTS,
    ProvenceAdapter,
    ProvenceSettings,
    budget_tokenizer_source,
    load_pruner,
    provence_metadata,
    pruner_source,
    retrieval_metadata,
)

__all__ = ["ProvenceRanker"]


@component
class ProvenceRanker(ProvenceAdapter):
    """Provence context pruning + reranking as a Haystack component.

    Args:
        pruner: a ProvencePruner, or a model folder / cached hub id (loaded in ``warm_up()``
            or on the first run; ``to_dict`` stores the folder, before and after a run).
        threshold, title, always_select_title, reorder, top_k, drop_empty, batch_size,
        target_tokens, target_total_tokens, target_ratio, budget_tokenizer: the shared settings
            of :class:`pipelines.rag.core.ProvenceSettings` (same defaults in every adapter).

    Every returned document is a copy whose ``content`` is the pruned text and whose
    ``score`` is the reranking score (it wins); its ``meta`` gains ``reranking_score``,
    ``provence_compression``, ``provence_kept_sentences`` and ``retrieval_score``: the
    retriever's score (when the document had one and ``meta`` holds no earlier one).
    """

    def __init__(
        self,
        pruner: Any,
        threshold: float = DEFAULTS.threshold,
        title: str | None = DEFAULTS.title,
        always_select_title: bool = DEFAULTS.always_select_title,
        reorder: bool = DEFAULTS.reorder,
        top_k: int | None = DEFAULTS.top_k,
        drop_empty: bool = DEFAULTS.drop_empty,
        batch_size: int = DEFAULTS.batch_size,
        target_tokens: int | None = DEFAULTS.target_tokens,
        target_total_tokens: int | None = DEFAULTS.target_total_tokens,
        target_ratio: float | None = DEFAULTS.target_ratio,
        budget_tokenizer: Any = DEFAULTS.budget_tokenizer,
    ):
        self.pruner = pruner
        settings = ProvenceSettings(
            threshold=threshold,
            title=title,
            always_select_title=always_select_title,
            reorder=reorder,
            top_k=top_k,
            drop_empty=drop_empty,
            batch_size=batch_size,
            target_tokens=target_tokens,
            target_total_tokens=target_total_tokens,
            target_ratio=target_ratio,
            budget_tokenizer=budget_tokenizer,
        )
        vars(self).update(dataclasses.asdict(settings))  # one attribute per setting
        self._loaded = None

    def warm_up(self) -> None:
        """Load the pruner (once)."""
        if self._loaded is None:
            self._loaded = load_pruner(self.pruner)

    def loaded_pruner(self):
        self.warm_up()
        return self._loaded

    def to_dict(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.settings())
        settings["budget_tokenizer"] = budget_tokenizer_source(self.budget_tokenizer)
        return default_to_dict(self, pruner=pruner_source(self.pruner), **settings)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProvenceRanker":
        return default_from_dict(cls, data)

    @staticmethod
    def translate(documents: list[Document], rows: list[dict]) -> dict[str, list[Document]]:
        """Rows of :meth:`prune` -> ``{"documents": pruned copies}``."""
        return {
            "documents": [
                replace(
                    documents[r["index"]],
                    content=r["pruned_context"],
                    score=r["reranking_score"],
                    meta={
                        **documents[r["index"]].meta,
                        **provence_metadata(r),
                        **retrieval_metadata(documents[r["index"]].meta, documents[r["index"]].score),
                    },
                )
                for r in rows
            ]
        }

    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document], query: str, top_k: int | None = None, threshold: float | None = None):
        """Prune ``documents`` for ``query`` (``top_k`` / ``threshold`` override the settings)."""
        docs = list(documents)
        rows = self.prune(query, [d.content or "" for d in docs], top_k=top_k, threshold=threshold)
        return self.translate(docs, rows)

    @component.output_types(documents=list[Document])
    async def run_async(
        self, documents: list[Document], query: str, top_k: int | None = None, threshold: float | None = None
    ):
        """:meth:`run` without blocking the event loop (the pruner runs in a worker thread)."""
        docs = list(documents)
        rows = await self.aprune(query, [d.content or "" for d in docs], top_k=top_k, threshold=threshold)
        return self.translate(docs, rows)
