"""The framework-free core of the RAG adapters: prune a query's retrieved texts with Provence.

:func:`prune_texts` is what every adapter calls; :class:`ProvenceSettings` holds the settings
(and so the defaults) the three adapters share; :class:`ProvenceAdapter` is the plumbing they
inherit: the pruner (a :class:`~tokenprune.provence.model.ProvencePruner` or a model folder,
loaded once: at construction by the pydantic adapters, in ``warm_up`` by Haystack's), the
sync core method :meth:`~ProvenceAdapter.prune` and its async twin
:meth:`~ProvenceAdapter.aprune`, which runs the pruner in a thread so the event loop is never
blocked. A new framework adapter is one module: a class that inherits :class:`ProvenceAdapter`
(or :class:`pipelines.rag.fields.ProvenceFields` for a pydantic framework), takes the settings
as ``**settings`` and builds them with :func:`build_settings`, and translates the framework's
documents to texts and the rows back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

from prunecore.budget import check_keep
from tokenprune.provence.pruner import ProvencePruner
from tokenprune.provence.result import ProvenceResult

__all__ = [
    "DEFAULTS",
    "DEPRECATED_SETTINGS",
    "METADATA_KEYS",
    "RETRIEVAL_SCORE_KEY",
    "ProvenceAdapter",
    "ProvenceSettings",
    "SETTING_NAMES",
    "build_settings",
    "load_pruner",
    "budget_tokenizer_source",
    "provence_metadata",
    "pruner_source",
    "retrieval_metadata",
    "prune_texts",
    "settings_values",
]

#: Metadata keys every adapter adds to a returned document.
METADATA_KEYS = ("reranking_score", "provence_compression", "provence_kept_sentences")
#: Metadata key under which the scored adapters (LlamaIndex, Haystack) keep the retriever's
#: score: their returned score is the reranking score.
RETRIEVAL_SCORE_KEY = "retrieval_score"


def setting(default: Any, doc: str) -> Any:
    """A field of :class:`ProvenceSettings` with its one-line description (the pydantic
    adapters show it as the field's description)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


#: Deprecated setting names -> what they mean as ``keep=`` (accepted for one release).
DEPRECATED_SETTINGS = {"target_tokens": "an int token count", "target_ratio": "a fraction"}


@dataclass(frozen=True)
class ProvenceSettings:
    """The pruning settings of every adapter, declared once (names, defaults, descriptions).

    Every adapter builds them through :func:`build_settings`: LangChain's and LlamaIndex's
    pydantic fields are generated from this class (:mod:`pipelines.rag.fields`) and Haystack's
    component takes them as ``**settings``.

    Attributes:
        threshold: the sentence rule's score threshold (``provence_sentences``; Provence
            default 0.1). Not a budget: it applies when no budget is given.
        title: ``"first_sentence"`` (the first sentence of each document is its title) or None.
        always_select_title: keep the title iff another sentence is kept.
        reorder: sort the documents by reranking score (descending).
        top_k: keep at most this many documents after pruning (None: all).
        drop_empty: drop documents pruned to nothing.
        batch_size: (query, block) pairs per forward pass.
        keep: the token budget of each document (the budget rule replaces the threshold): a
            fraction in (0, 1] of its tokens or an int token count.
        target_total_tokens: a second budget, in tokens over all documents of the query.
        budget_tokenizer: count the budgets in the generator's tokens: a Hugging Face
            tokenizer, a tokenizer folder, or a callable ``text -> token count`` (None: the
            pruner's tokens).
        target_tokens, target_ratio: deprecated spellings of ``keep=<int>`` and
            ``keep=<fraction>`` (init-only: a DeprecationWarning, then stored as ``keep``).

    With ``top_k`` the budgets are spent on the documents that are returned: the ``top_k``
    first (by reranking score with ``reorder``, else in input order) that keep something.
    """

    threshold: float = setting(0.1, "sentence rule score threshold (Provence default 0.1); not a budget")
    title: str | None = setting("first_sentence", "'first_sentence' (first sentence is the title) or None")
    always_select_title: bool = setting(False, "keep the title iff another sentence is kept")
    reorder: bool = setting(False, "sort documents by reranking score, descending")
    top_k: int | None = setting(None, "keep at most this many documents (None: all)")
    drop_empty: bool = setting(True, "drop documents pruned to nothing")
    batch_size: int = setting(32, "(query, block) pairs per forward pass")
    keep: float | int | None = setting(
        None, "token budget per document: a fraction in (0, 1] of its tokens or an int token count"
    )
    target_total_tokens: int | None = setting(None, "token budget over all documents of the query")
    budget_tokenizer: Any = setting(
        None, "count budgets in the generator's tokens: a HF tokenizer, a tokenizer folder or text -> int"
    )
    target_tokens: dataclasses.InitVar[int | None] = None
    target_ratio: dataclasses.InitVar[float | None] = None

    def __post_init__(self, target_tokens, target_ratio) -> None:
        aliases = {k: v for k, v in (("target_tokens", target_tokens), ("target_ratio", target_ratio)) if v is not None}
        for name, value in aliases.items():
            warnings.warn(
                f"ProvenceSettings({name}=) is deprecated: pass keep={value!r} ({DEPRECATED_SETTINGS[name]})",
                DeprecationWarning,
                stacklevel=4,
            )
        if len(aliases) + (self.keep is not None) > 1:
            raise ValueError(
                f"pass one per-document budget, keep=, not {sorted(aliases) + ['keep'] * (self.keep is not None)}"
            )
        if aliases:
            object.__setattr__(self, "keep", next(iter(aliases.values())))
        if self.keep is not None:
            check_keep(self.keep)
        if self.target_total_tokens is not None:
            check_keep(self.target_total_tokens)


DEFAULTS = ProvenceSettings()
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(ProvenceSettings))


def build_settings(**settings) -> ProvenceSettings:
    """The one way an adapter builds its settings from keyword values.

    Unknown names raise a TypeError listing the known ones; the deprecated names
    (:data:`DEPRECATED_SETTINGS`) are mapped to ``keep`` with a DeprecationWarning; a bad
    ``keep`` raises the error of :func:`prunecore.budget.check_keep`.
    """
    unknown = sorted(set(settings) - set(SETTING_NAMES) - set(DEPRECATED_SETTINGS))
    if unknown:
        raise TypeError(f"unknown Provence setting(s) {unknown}; known: {list(SETTING_NAMES)}")
    return ProvenceSettings(**settings)


def settings_values(settings: ProvenceSettings) -> dict[str, Any]:
    """``{name: value}`` of every setting (values not copied, unlike ``dataclasses.asdict``)."""
    return {name: getattr(settings, name) for name in SETTING_NAMES}


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
    ``keep=``, ``reorder=``, ``top_k=``..., built by :func:`build_settings`). Returns one dict
    per surviving text (``index`` into ``texts``, ``pruned_context``, ``reranking_score``,
    ``compression``, ``kept_sentences``), in input order, or by score descending with
    ``reorder``; ``top_k`` (if given) keeps the first ones.
    """
    settings = build_settings(**{**settings_values(settings or DEFAULTS), **overrides})
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if not texts:
        return []
    scored = pruner.score(query, list(texts), title=settings.title, batch_size=settings.batch_size)
    rule = {
        "threshold": settings.threshold,
        "always_select_title": settings.always_select_title,
        "keep": settings.keep,
        "target_total_tokens": settings.target_total_tokens,
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


def decided_rows(out: ProvenceResult) -> list[dict]:
    """The one-query output of :meth:`ProvencePruner.decide` as one row per text."""
    return [
        {
            "index": i,
            "pruned_context": out.pruned_context[i],
            "reranking_score": out.reranking_score[i],
            "compression": out.compression[i],
            "kept_sentences": out.kept_sentences[i],
        }
        for i in range(len(out.pruned_context))
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
        return build_settings(**values)

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
