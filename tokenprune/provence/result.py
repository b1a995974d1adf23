"""The result of :meth:`~tokenprune.provence.pruner.ProvencePruner.process`: :class:`ProvenceResult`."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenprune.stats import TokenStats

from .core import assemble_pruned, compression

__all__ = ["RESULT_KEYS", "ProvenceResult", "context_fields"]

#: Per-context fields of :class:`ProvenceResult` (the released ``process()`` dict keys).
RESULT_KEYS = (
    "pruned_context",
    "reranking_score",
    "kept_sentences",
    "kept_spans",
    "compression",
    "compression_rate",
    "token_compression",
)


@dataclass
class ProvenceResult:
    """What :meth:`ProvencePruner.process` / :meth:`~ProvencePruner.decide` return.

    Every per-context field has the shape of the call's input: a scalar for ``(str, str)``, a
    list for ``(str, [str])`` or one context per question, a list of lists (one per question)
    for nested contexts; with ``reorder=True`` the contexts are sorted by reranking score and
    cut to ``top_k``.

    Attributes:
        pruned_context: the pruned texts (exact sentences of the originals).
        reranking_score: the reranking logits (max over a context's blocks).
        kept_sentences: sorted indices of the kept sentences of each context.
        kept_spans: ``(start, end)`` character offsets of the kept sentences in the context
            as passed (a separately given title has none).
        compression: share of characters removed; ``compression_rate``: the same in percent
            (OpenProvence's key); ``token_compression``: share of context tokens removed.
        stats: one :class:`~tokenprune.stats.TokenStats` of the call (``method="provence"``;
            context tokens in / inside kept sentences; ``forward_passes``: forward passes of
            the Provence model; extras ``contexts`` and ``blocks``).
        context_index: with ``reorder=True``, the original positions of the returned
            contexts (None otherwise).

    ``result["pruned_context"]`` (the dict of earlier releases) still works for one release
    and warns; use the attributes.
    """

    pruned_context: Any
    reranking_score: Any
    kept_sentences: Any
    kept_spans: Any
    compression: Any
    compression_rate: Any
    token_compression: Any
    stats: TokenStats
    context_index: Any = None

    def keys(self) -> list[str]:
        """The keys the dict of earlier releases had (``context_index`` only with ``reorder``)."""
        names = [f.name for f in dataclasses.fields(self)]
        return [n for n in names if n != "context_index" or self.context_index is not None]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> Any:
        """Deprecated dict access: ``result[key]`` is ``getattr(result, key)``."""
        if key not in self.keys():
            raise KeyError(key)
        warnings.warn(
            f"ProvenceResult[{key!r}] is deprecated (process() returned a dict until this release); use result.{key}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, key)


def context_fields(info: dict, keep: np.ndarray, n_kept: int) -> dict[str, Any]:
    """The :data:`RESULT_KEYS` of one context.

    Args:
        info: the context's scored item (``text``, ``sents`` (S, 2) character spans,
            ``ctx_start``: where the context as passed starts in ``text``, ``offsets`` (T, 2),
            ``score``). keep: (S,) bool kept sentences. n_kept: tokens inside them.
    """
    pruned = assemble_pruned(info["text"], info["sents"], keep)
    char_share = compression(info["text"], pruned)
    in_ctx = info["sents"][keep] - info["ctx_start"]
    n_tokens = len(info["offsets"])
    return {
        "pruned_context": pruned,
        "reranking_score": info["score"],
        "kept_sentences": np.flatnonzero(keep).tolist(),
        "kept_spans": [tuple(s) for s in in_ctx[in_ctx[:, 0] >= 0].tolist()],
        "compression": char_share,
        "compression_rate": 100.0 * char_share,
        "token_compression": 1.0 - n_kept / n_tokens if n_tokens else 0.0,
    }
