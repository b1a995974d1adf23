"""The token budget rule of :class:`~tokenprune.provence.pruner.ProvencePruner`: budgets,
budget tokenizers and the sentence masks of one question's contexts under them.

The model-free selection itself is :func:`tokenprune.provence.core.budget_sentences`; this
module turns a call's ``keep`` (and the deprecated spellings) into per-context and total token
budgets, counts tokens with a generator's tokenizer when asked, and applies the rule to the
scored items of :meth:`~tokenprune.provence.pruner.ProvencePruner.score`.
"""

from __future__ import annotations

import functools
import numbers
import os
import warnings
from collections.abc import Callable

import numpy as np

from prunecore.budget import check_keep, keep_count, rank_order
from prunecore.models import load_tokenizer

from .checkpoint import resolve_checkpoint_dir
from .core import assemble_pruned, budget_sentences, sentence_scores

__all__ = [
    "budget_keeps",
    "call_budgets",
    "cached_tokenizer",
    "check_candidates",
    "check_int_budget",
    "counted_budget_sentences",
    "keep_as_targets",
    "token_counter",
]


def call_budgets(keep, target_tokens, target_total_tokens, target_ratio):
    """A call's budgets as ``(keep_int, target_tokens, target_ratio)`` for :func:`budget_keeps`.

    ``keep`` (checked by :func:`prunecore.budget.check_keep`) is the per-context budget;
    ``target_tokens`` / ``target_ratio`` are its deprecated spellings (a DeprecationWarning
    naming ``keep=``, then the same check); ``target_total_tokens`` must be an int count.
    ``keep_int`` is ``keep`` when it is a count (refused when smaller than every sentence).
    """
    for name, value in (("target_tokens", target_tokens), ("target_total_tokens", target_total_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} is a token count: pass an int, got {value!r}")
    for name, value, kind in (
        ("target_tokens", target_tokens, "an int token count"),
        ("target_ratio", target_ratio, "a fraction"),
    ):
        if value is not None:
            warnings.warn(
                f"{name}= is deprecated: pass keep={value!r} ({kind}; keep= is the one budget of every method)",
                DeprecationWarning,
                stacklevel=4,
            )
    for value in (target_tokens, target_total_tokens, None if target_ratio is None else float(target_ratio)):
        if value is not None:
            check_keep(value)
    keep_int = keep if isinstance(keep, numbers.Integral) and not isinstance(keep, bool) else None
    return (keep_int, *keep_as_targets(keep, target_tokens, target_ratio))


def keep_as_targets(keep, target_tokens, target_ratio):
    """``keep=`` (a fraction or a count, checked by the one budget rule) as ``(target_tokens,
    target_ratio)``; a ValueError when it would override an explicit target."""
    if keep is None:
        return target_tokens, target_ratio
    check_keep(keep)
    if isinstance(keep, numbers.Integral):
        if target_tokens is not None:
            raise ValueError("pass either keep=<count> or target_tokens=, not both")
        return int(keep), target_ratio
    if target_ratio is not None:
        raise ValueError("pass either keep=<fraction> or target_ratio=, not both")
    return target_tokens, float(keep)


def token_counter(budget_tokenizer) -> Callable[[str], int] | None:
    """``text -> token count`` of a budget tokenizer (None: count the pruner's own tokens).

    Accepts a Hugging Face tokenizer (counted without special tokens), a tokenizer folder /
    cached hub id (loaded once, no remote code) or a callable ``text -> int``.
    """
    if budget_tokenizer is None:
        return None
    if isinstance(budget_tokenizer, (str, os.PathLike)):
        budget_tokenizer = cached_tokenizer(os.fspath(budget_tokenizer))
    if hasattr(budget_tokenizer, "num_special_tokens_to_add") and hasattr(budget_tokenizer, "encode"):
        tok = budget_tokenizer
        return lambda text: len(tok.encode(text, add_special_tokens=False, verbose=False))
    if callable(budget_tokenizer):
        fn = budget_tokenizer

        def count(text: str) -> int:
            n = fn(text)
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                raise TypeError(f"budget_tokenizer must return a non-negative int token count, got {n!r}")
            return int(n)

        return count
    raise TypeError(
        "budget_tokenizer must be a Hugging Face tokenizer, a tokenizer folder, or a callable text -> token "
        f"count (e.g. lambda s: len(enc.encode(s)) for tiktoken), got {type(budget_tokenizer).__name__}"
    )


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name_or_path: str):
    """A budget tokenizer loaded once per folder / cached hub id (no download, no remote code)."""
    return load_tokenizer(resolve_checkpoint_dir(name_or_path))


def check_candidates(candidates, items: list[list[dict]]) -> list[int] | None:
    """``budget_candidates`` as a list of context indices of the single question (or None)."""
    if candidates is None:
        return None
    if len(items) != 1:
        raise ValueError(f"budget_candidates needs a single question, got {len(items)}")
    out = [int(i) for i in candidates]
    if any(not 0 <= i < len(items[0]) for i in out):
        raise ValueError(f"budget_candidates {out} out of range for {len(items[0])} contexts")
    return out


def check_int_budget(shortest: int | None, keep_int, target_tokens, target_total) -> None:
    """Refuse (``keep=<int>``) or warn (``target_tokens`` / ``target_total_tokens``) when an
    integer token budget is smaller than every sentence, so every context would come back
    empty. ``shortest``: tokens of the shortest sentence that could be kept (None: none)."""
    ints = [b for b in (target_tokens, target_total) if b is not None]
    if shortest is None or not ints or min(ints) >= shortest:
        return
    if keep_int is not None and keep_int == min(ints):
        raise ValueError(
            f"keep={keep_int} is a budget of {keep_int} token(s) (an int keep is a token count), smaller than "
            f"every sentence (the shortest has {shortest} tokens): every context would be pruned to nothing. "
            f"To keep everything pass keep=1.0 (a fraction) or no budget; for a token budget pass keep >= {shortest}"
        )
    warnings.warn(
        f"token budget {min(ints)} (target_tokens={target_tokens}, target_total_tokens={target_total}) is smaller "
        f"than every sentence (the shortest has {shortest} tokens): every context is pruned to nothing. To keep "
        f"everything pass no budget (or target_ratio=1.0 / keep=1.0); for a token budget pass at least {shortest}",
        UserWarning,
        stacklevel=4,
    )


def budget_keeps(
    row: list[dict],
    spans: list,
    always_select_title: bool,
    target_tokens,
    target_total,
    target_ratio,
    *,
    count: Callable[[str], int] | None = None,
    candidates: list[int] | None = None,
):
    """Sentence keep masks of one question's contexts under the token budgets.

    ``row``: the contexts' scored items; ``spans``: their (S_c, 2) token spans. Budgets per
    context: ``target_tokens`` and ``keep_count(T_c, target_ratio)`` (the smaller), and
    ``target_total`` over the row. With ``always_select_title`` the title is taken first so
    that it fits inside the budget. ``count``: ``text -> tokens`` of the budget tokenizer
    (None: the pruner's tokens); then every pruned context is counted whole, as it will be
    sent (:func:`counted_budget_sentences`: token counts need not add up over sentences).
    ``candidates``: the contexts the budgets are spent on (None: all); the others keep nothing.

    Returns ``(masks, shortest)``: the (S_c,) bool masks, and the tokens of the shortest
    sentence that could be kept (None when there is none), for :func:`check_int_budget`.
    """
    if not row:
        return [], None
    chosen = set(range(len(row)) if candidates is None else candidates)
    scores, lengths, groups, group_budgets = [], [], [], []
    for c, (info, sp) in enumerate(zip(row, spans)):
        sc = sentence_scores(info["probs"], sp)
        if always_select_title and info["title_idx"] is not None and np.isfinite(sc[info["title_idx"]]):
            sc[info["title_idx"]] = np.inf
        if c not in chosen:
            sc[:] = -np.inf
        scores.append(sc)
        if count is None:
            lengths.append(sp[:, 1] - sp[:, 0])
            n_tokens = len(info["offsets"])
        else:
            lengths.append(np.array([count(info["text"][a:b]) for a, b in info["sents"]], dtype=np.int64))
            n_tokens = count(info["text"])
        groups.append(np.full(len(sp), c))
        cap = n_tokens if target_tokens is None else int(target_tokens)
        if target_ratio is not None:
            cap = min(cap, keep_count(n_tokens, float(target_ratio)))
        group_budgets.append(cap)
    scores, lengths, groups = np.concatenate(scores), np.concatenate(lengths), np.concatenate(groups)
    keepable = (scores != -np.inf) & (lengths > 0)
    shortest = int(lengths[keepable].min()) if keepable.any() else None
    bounds = np.cumsum([0] + [len(sp) for sp in spans])
    if count is None:
        keep = budget_sentences(scores, lengths, groups=groups, group_budgets=group_budgets, total_budget=target_total)
    else:
        keep = counted_budget_sentences(row, scores, groups, bounds, group_budgets, target_total, count)
    return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])], shortest


def counted_budget_sentences(row, scores, groups, bounds, group_budgets, target_total, count) -> np.ndarray:
    """The budget rule of :func:`~tokenprune.provence.core.budget_sentences` with a token
    count that need not add up over sentences: sentences are visited by score (best first,
    ties by position) and one is kept when the whole pruned text of its context, counted by
    ``count``, still fits its context's budget and the sum over contexts the total budget.

    Returns the (N,) bool mask over the concatenated sentences of ``row``.
    """
    keep = np.zeros(scores.shape[0], dtype=bool)
    used = np.zeros(len(row), dtype=np.int64)
    total = np.iinfo(np.int64).max if target_total is None else int(target_total)
    for i in rank_order(scores).tolist():
        if scores[i] == -np.inf:
            continue
        g = int(groups[i])
        keep[i] = True
        mask = keep[bounds[g] : bounds[g + 1]]
        n = count(assemble_pruned(row[g]["text"], row[g]["sents"], mask))
        if n <= group_budgets[g] and used.sum() - used[g] + n <= total:
            used[g] = n
        else:
            keep[i] = False
    return keep
