"""Haystack adapter: :class:`ProvenceRanker`, a component with ``run`` and ``run_async``.

Importing this module imports ``haystack``. The module deliberately has no
``from __future__ import annotations``: Haystack reads the sockets' types from the live
annotations, so ``pipe.connect("retriever.documents", "provence.documents")`` type-checks::

    pipe.add_component("provence", ProvenceRanker(pruner="path/to/provence"))
    pipe.connect("retriever.documents", "provence.documents")
"""

from dataclasses import replace
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict

from .core import (
    ProvenceAdapter,
    budget_tokenizer_source,
    build_settings,
    load_pruner,
    provence_metadata,
    pruner_source,
    retrieval_metadata,
    settings_values,
)

__all__ = ["ProvenceRanker"]


@component
class ProvenceRanker(ProvenceAdapter):
    """Provence context pruning + reranking as a Haystack component.

    Args:
        pruner: a ProvencePruner, or a model folder / cached hub id (loaded in ``warm_up()``
            or on the first run; ``to_dict`` stores the folder, before and after a run).
        **settings: ``threshold``, ``title``, ``always_select_title``, ``reorder``, ``top_k``,
            ``drop_empty``, ``batch_size``, ``keep``, ``target_total_tokens``,
            ``budget_tokenizer``: the shared settings of
            :class:`pipelines.rag.core.ProvenceSettings` (same names and defaults in every
            adapter; ``target_tokens`` / ``target_ratio`` are deprecated spellings of ``keep``).

    Every returned document is a copy whose ``content`` is the pruned text and whose
    ``score`` is the reranking score (it wins); its ``meta`` gains ``reranking_score``,
    ``provence_compression``, ``provence_kept_sentences`` and ``retrieval_score``: the
    retriever's score (when the document had one and ``meta`` holds no earlier one).
    """

    def __init__(self, pruner: Any, **settings: Any):
        self.pruner = pruner
        # one attribute per setting, built (and checked) by the one settings function
        vars(self).update(settings_values(build_settings(**settings)))
        self._loaded = None

    def warm_up(self) -> None:
        """Load the pruner (once)."""
        if self._loaded is None:
            self._loaded = load_pruner(self.pruner)

    def loaded_pruner(self):
        self.warm_up()
        return self._loaded

    def to_dict(self) -> dict[str, Any]:
        settings = settings_values(self.settings())
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
