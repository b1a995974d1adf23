"""The framework-free core of the RAG adapters: prune a query's retrieved texts with Provence.

:func:`prune_texts` is what every adapter calls; :class:`ProvenceSettings` holds the settings
(and so the defaults) the three adapters share; :class:`ProvenceAdapter` is the plumbing they
inherit: the pruner (a :class:`~tokenprune.provence.model.ProvencePruner` or a model folder,
loaded once: at construction by the pydantic adapters, in ``warm_up`` by Haystack's), the
sync core method :meth:`~ProvenceAdapter.prune` and its async twin
:meth:`~ProvenceAdapter.aprune`, which runs the pruner in a thread so the event loop is never
blocked. A new framework adapter is one module: a class that inherits :class:`ProvenceAdapter`,
declares the fields of :class:`ProvenceSettings` with these defaults, and translates the
framework's documents to texts and the rows back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

from tokenprune.provence.model import ProvencePruner

__all__ = [
    "DEFAULTS",
    "METADATA_KEYS",
    "RETRIEVAL_SCORE_KEY",
    "ProvenceAdapter",
    "ProvenceSettings",
    "load_pruner",
    "budget_tokenizer_source",
    "provence_metadata",
    "pruner_source",
    "retrieval_metadata",
    "prune_texts",
]

#: Metadata keys every adapter adds to a returned document.
METADATA_KEYS = ("reranking_score", "provence_compression", "provence_kept_sentences")
#: Metadata key under which the scored adapters (LlamaIndex, Haystack) keep the retriever's
#: score: their returned score is the reranking score.
RETRIEVAL_SCORE_KEY = "retrieval_score"


@dataclass(frozen=True)
class ProvenceSettings:
    """The pruning settings of every adapter (one place for their defaults).

    Attributes:
        threshold: sentence rule threshold (``provence_sentences``; Provence default 0.1).
        title: ``"first_sentence"`` (the first sentence of each document is its title) or None.
        always_select_title: keep the title iff another sentence is kept.
        reorder: sort the documents by reranking score (descending).
        top_k: keep at most this many documents after pruning (None: all).
        drop_empty: drop documents pruned to nothing.
        batch_size: (query, block) pairs per forward pass.
        target_tokens: token budget per document (the budget rule replaces the threshold).
        target_total_tokens: token budget over all documents of the query.
        target_ratio: keep at most this share of each document's tokens.
        budget_tokenizer: count the budgets in the generator's tokens: a Hugging Face
            tokenizer, a tokenizer folder, or a callable ``text -> token count`` (None: the
            pruner's tokens).

    With ``top_k`` the budgets are spent on the documents that are returned: the ``top_k``
    first (by reranking score with ``reorder``, else in input order) that keep something.
    """

    threshold: float = 0.1
    title: str | None = "first_sentence"
    always_select_title: bool = False
    reorder: bool = False
    top_k: int | None = None
    drop_empty: bool = True
    batch_size: int = 32
    target_tokens: int | None = None
    target_total_tokens: int | None = None
    target_ratio: float | None = None
    budget_tokenizer: Any = None


DEFAULTS = ProvenceSettings()
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(ProvenceSettings))


def load_pruner(pruner) -> ProvencePruner:
    """A :class:`ProvencePruner` as is, or one loaded from a model folder / cached hub id."""
    if isinstance(pruner, ProvencePruner):
        return pruner
    if isinstance(pruner, (str, os.PathLike)):
        return ProvencePruner(pruner)
    raise TypeError(f"pruner must be a ProvencePruner or a model folder, got {type(pruner).__name__}")


def pruner_source(pruner) -> str:
    """The folder a pruner is (re)loaded from, for serialising an adapter.

    A path is returned as a string; a :class:`ProvencePruner` loaded from a folder gives that
    folder. A pruner built from an in-memory model has none: a ValueError says to save it.
    """
    if isinstance(pruner, (str, os.PathLike)):
        return os.fspath(pruner)
    source = getattr(pruner, "source", None)
    if source is None:
        raise ValueError(
            "this ProvencePruner was built from an in-memory model, so the adapter cannot be serialised; "
            "save it with tokenprune.provence.save_provence_model(model, tokenizer, folder) and pass the folder"
        )
    return source


def budget_tokenizer_source(budget_tokenizer) -> str | None:
    """The folder a budget tokenizer is (re)loaded from, for serialising an adapter.

    None and a folder stay as they are; a Hugging Face tokenizer loaded from a local folder
    gives that folder. A callable or an in-memory tokenizer cannot be serialised: a
    ValueError says to pass a folder.
    """
    if budget_tokenizer is None or isinstance(budget_tokenizer, (str, os.PathLike)):
        return None if budget_tokenizer is None else os.fspath(budget_tokenizer)
    source = getattr(budget_tokenizer, "name_or_path", None)
    if isinstance(source, str) and os.path.isdir(source):
        return source
    raise ValueError(
        f"budget_tokenizer {type(budget_tokenizer).__name__} cannot be serialised (a callable, or a tokenizer "
        "not loaded from a local folder); save the tokenizer with tokenizer.save_pretrained(folder) and pass the folder"
    )


def ranking(rows: list[dict], reorder: bool) -> list[int]:
    """Indices of ``rows`` in the order ``top_k`` takes them: by reranking score descending
    (ties by position) with ``reorder``, else in input order."""
    order = list(range(len(rows)))
    return sorted(order, key=lambda i: -rows[i]["reranking_score"]) if reorder else order


def prune_texts(
    pruner: ProvencePruner, query: str, texts: list[str], settings: ProvenceSettings | None = None, **overrides
) -> list[dict]:
    """Prune ``texts`` for ``query``; the framework-independent core of the adapters.

    ``settings`` (default :data:`DEFAULTS`) with keyword ``overrides`` (``threshold=``,
    ``reorder=``, ``top_k=``...). Returns one dict per surviving text (``index`` into
    ``texts``, ``pruned_context``, ``reranking_score``, ``compression``, ``kept_sentences``),
    in input order, or by score descending with ``reorder``; ``top_k`` (if given) keeps the
    first ones.
    """
    settings = dataclasses.replace(settings or DEFAULTS, **overrides)
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if not texts:
        return []
    scored = pruner.score(query, list(texts), title=settings.title, batch_size=settings.batch_size)
    rule = {
        "threshold": settings.threshold,
        "always_select_title": settings.always_select_title,
        "target_tokens": settings.target_tokens,
        "target_total_tokens": settings.target_total_tokens,
        "target_ratio": settings.target_ratio,
        "budget_tokenizer": settings.budget_tokenizer,
    }
    rows = decided_rows(pruner.decide(scored, **rule))
    if settings.top_k is not None and settings.target_total_tokens is not None:
        # the total budget is spent on the documents top_k returns: the first top_k in
        # ranking order, skipping (with drop_empty) those that keep nothing even so
        order, skipped = ranking(rows, settings.reorder), set()
        while True:
            chosen = [i for i in order if i not in skipped][: int(settings.top_k)]
            rows = decided_rows(pruner.decide(scored, budget_candidates=chosen, **rule))
            empty = {i for i in chosen if not rows[i]["pruned_context"].strip()}
            if not settings.drop_empty or not empty or len(order) - len(skipped) <= len(chosen):
                break
            skipped |= empty
    if settings.drop_empty:
        rows = [r for r in rows if r["pruned_context"].strip()]
    if settings.reorder:
        rows.sort(key=lambda r: -r["reranking_score"])
    if settings.top_k is not None:
        rows = rows[: int(settings.top_k)]
    return rows


def decided_rows(out: dict) -> list[dict]:
    """The one-query output of :meth:`ProvencePruner.decide` as one row per text."""
    return [
        {
            "index": i,
            "pruned_context": out["pruned_context"][i],
            "reranking_score": out["reranking_score"][i],
            "compression": out["compression"][i],
            "kept_sentences": out["kept_sentences"][i],
        }
        for i in range(len(out["pruned_context"]))
    ]


def retrieval_metadata(metadata: dict, score: float | None) -> dict:
    """``{RETRIEVAL_SCORE_KEY: score}`` for a document whose score the reranking score
    replaces; empty when it had none or already keeps an earlier retriever's score."""
    if score is None or RETRIEVAL_SCORE_KEY in metadata:
        return {}
    return {RETRIEVAL_SCORE_KEY: score}


def provence_metadata(row: dict) -> dict:
    """The metadata an adapter adds to a returned document (keys :data:`METADATA_KEYS`)."""
    return {
        "reranking_score": row["reranking_score"],
        "provence_compression": row["compression"],
        "provence_kept_sentences": list(row["kept_sentences"]),
    }


class ProvenceAdapter:
    """Shared plumbing of the framework adapters (framework-free).

    A subclass provides the attributes ``pruner`` (a ProvencePruner or a model folder) and
    every name of :class:`ProvenceSettings`, and implements the framework's translation
    method on top of :meth:`prune` / :meth:`aprune`.
    """

    def settings(self, **overrides) -> ProvenceSettings:
        """The adapter's settings, with per-call ``overrides`` (None values ignored)."""
        values = {name: getattr(self, name) for name in SETTING_NAMES}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return ProvenceSettings(**values)

    def loaded_pruner(self) -> ProvencePruner:
        """The pruner, loaded from its folder on first use."""
        return load_pruner(self.pruner)

    def prune(self, query: str, texts: list[str], **overrides) -> list[dict]:
        """Framework-free core: :func:`prune_texts` with this adapter's settings."""
        return prune_texts(self.loaded_pruner(), query, texts, self.settings(**overrides))

    async def aprune(self, query: str, texts: list[str], **overrides) -> list[dict]:
        """:meth:`prune` in a worker thread: the event loop keeps running meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, partial(self.prune, query, texts, **overrides))
