"""Provence (Chirkova et al., ICLR 2025): the pure steps of query-aware context pruning.

A Provence model reads ``[CLS] normalised_query [SEP] context [SEP]`` and emits one reranking
logit plus a keep probability per context token. This module holds the model-free steps that
turn those token probabilities into kept sentences (numpy in, numpy out; no files, no models):

* :func:`normalize_query` — lowercase, strip ASCII punctuation, collapse whitespace;
* :func:`token_sentence_spans` — sentences (character spans) -> token spans via tokenizer offsets;
* :func:`provence_sentences` — the sentence decision (``decision_average``, ``probability_average``,
  ``majority``);
* :func:`apply_title_rule` — the ``always_select_title`` rule;
* :func:`plan_blocks` / :func:`stitch_blocks` — long contexts split into windows with the query
  repeated, and stitched back (max reranking score over blocks);
* :func:`sentence_scores` / :func:`budget_sentences` — the token budget rule (the
  highest-scoring sentences that fit per-document and total budgets);
* :func:`assemble_pruned` / :func:`compression` — the pruned text made of exact substrings;
* :func:`batch_inputs` / :func:`batch_titles` / :func:`shape_outputs` — the released
  ``process()`` input shapes (str / list / nested lists) to one nested form and back.

The model, loading and :class:`~tokenprune.provence.model.ProvencePruner` live in
:mod:`tokenprune.provence.model`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from prunecore.budget import rank_order

__all__ = [
    "MODES",
    "normalize_query",
    "token_sentence_spans",
    "provence_sentences",
    "apply_title_rule",
    "plan_blocks",
    "stitch_blocks",
    "assemble_pruned",
    "compression",
    "kept_token_count",
    "sentence_scores",
    "budget_sentences",
    "batch_inputs",
    "batch_titles",
    "shape_outputs",
]

MODES = ("decision_average", "probability_average", "majority")

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")


def normalize_query(query: str) -> str:
    """Provence query normalisation: lowercase, drop ASCII punctuation, collapse whitespace."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    return _WS.sub(" ", query.lower().translate(_PUNCT_TABLE)).strip()


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def token_sentence_spans(token_offsets, sentence_spans) -> np.ndarray:
    """Map sentences (character spans) to token spans.

    A token belongs to the sentence that contains its last character (so a token carrying a
    leading space, as in SentencePiece/BPE vocabularies, goes with the word it ends in);
    tokens whose last character falls in the whitespace between sentences belong to none.

    Args:
        token_offsets: (T, 2) int character ``(start, end)`` of each context token, in text
            order (non-decreasing). Empty tokens (``start == end``) are allowed.
        sentence_spans: (S, 2) int character ``(start, end)`` of each sentence, ascending and
            non-overlapping.

    Returns:
        (S, 2) int64 token spans ``[start, end)`` into the T tokens (empty when no token).
    """
    off = _as_numpy(token_offsets).astype(np.int64).reshape(-1, 2)
    sent = np.asarray(sentence_spans, dtype=np.int64).reshape(-1, 2)
    if off.size and np.any(off[:, 1] < off[:, 0]):
        raise ValueError("token_offsets: every end must be >= its start")
    last = np.where(off[:, 1] > off[:, 0], off[:, 1] - 1, off[:, 0])
    if last.size > 1 and np.any(np.diff(last) < 0):
        raise ValueError("token_offsets must be in text order (non-decreasing)")
    if sent.size and (np.any(sent[:, 1] < sent[:, 0]) or np.any(sent[1:, 0] < sent[:-1, 1])):
        raise ValueError("sentence_spans must be ascending, non-overlapping (start <= end)")
    starts = np.searchsorted(last, sent[:, 0], side="left")
    ends = np.searchsorted(last, sent[:, 1], side="left")
    return np.stack([starts, ends], axis=1).astype(np.int64)


def provence_sentences(token_probs, spans, *, threshold: float = 0.1, mode: str = "decision_average") -> np.ndarray:
    """Decide which sentences to keep from per-token keep probabilities.

    Args:
        token_probs: (T,) keep probabilities in [0, 1] (``softmax(token_logits)[..., 1]``).
        spans: (S, 2) int token spans ``[start, end)`` of each sentence into ``token_probs``.
        threshold: T in the rules below (Provence default 0.1).
        mode: ``"decision_average"`` (released code, default): a token is kept iff ``p > T``
            and a sentence iff the fraction of its kept tokens is ``> T`` (the same T);
            ``"probability_average"``: sentence kept iff the mean of ``p`` is ``> T``;
            ``"majority"`` (the paper's wording): kept iff more than half of its tokens have
            ``p > T``.

    Returns:
        (S,) bool; sentences without tokens are never kept.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    p = _as_numpy(token_probs).astype(np.float64)
    if p.ndim != 1:
        raise ValueError(f"token_probs must be 1-D (T,), got shape {p.shape}")
    if np.isnan(p).any():
        raise ValueError("token_probs contains NaN")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("token_probs must lie in [0, 1]")
    sp = np.asarray(spans, dtype=np.int64)
    if sp.size == 0:
        return np.zeros(0, dtype=bool)
    if sp.ndim != 2 or sp.shape[1] != 2:
        raise ValueError(f"spans must have shape (S, 2), got {sp.shape}")
    if sp.min() < 0 or sp.max() > p.shape[0] or np.any(sp[:, 1] < sp[:, 0]):
        raise ValueError(f"spans must satisfy 0 <= start <= end <= T={p.shape[0]}")
    if not np.isfinite(threshold):
        raise ValueError("threshold must be finite")
    x = p if mode == "probability_average" else (p > threshold).astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    total = csum[sp[:, 1]] - csum[sp[:, 0]]
    n = (sp[:, 1] - sp[:, 0]).astype(np.float64)
    nonempty = n > 0
    safe_n = np.where(nonempty, n, 1.0)
    if mode == "majority":
        keep = 2.0 * total > n
    else:
        keep = total / safe_n > threshold
    return keep & nonempty


def apply_title_rule(keep, *, title_index: int | None = 0, always_select_title: bool = False) -> np.ndarray:
    """Apply Provence's title rule to a sentence keep mask.

    With ``always_select_title=True`` the title sentence is kept exactly when at least one
    other sentence is kept (so when nothing else passes, the output is empty even if the title
    passed). With ``False`` (or no title) the mask is returned unchanged.

    Args:
        keep: (S,) bool.
        title_index: index of the title sentence, or None when there is no title.

    Returns:
        (S,) bool (a copy).
    """
    keep = np.array(keep, dtype=bool, copy=True)
    if not always_select_title or title_index is None or keep.size == 0:
        return keep
    if not 0 <= title_index < keep.size:
        raise ValueError(f"title_index {title_index} out of range for {keep.size} sentences")
    others = np.delete(keep, title_index)
    keep[title_index] = bool(others.any())
    return keep


def plan_blocks(sentence_token_starts, n_tokens: int, budget: int) -> list[tuple[int, int]]:
    """Split a tokenised context into blocks of at most ``budget`` tokens.

    Whole sentences are packed greedily; a sentence longer than ``budget`` is cut into pieces
    of ``budget`` tokens (its pieces are stitched back by :func:`stitch_blocks`).

    Args:
        sentence_token_starts: (S,) int, first token of each sentence, ascending; sentence i
            covers tokens ``[starts[i], starts[i+1])`` (tokens before ``starts[0]`` go with
            sentence 0).
        n_tokens: total number of context tokens T.
        budget: max context tokens per block (window minus query and special tokens), >= 1.

    Returns:
        list of ``(tok_start, tok_end)`` covering ``[0, T)`` in order; ``[(0, 0)]`` when T == 0.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    if n_tokens <= 0:
        return [(0, 0)]
    starts = np.asarray(sentence_token_starts, dtype=np.int64).reshape(-1)
    bounds = np.unique(np.concatenate([[0], np.clip(starts, 0, n_tokens), [n_tokens]]))
    blocks: list[tuple[int, int]] = []
    cur_start, cur_end = 0, 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b - cur_start <= budget:
            cur_end = b
            continue
        if cur_end > cur_start:
            blocks.append((cur_start, cur_end))
        cur_start = a
        while b - cur_start > budget:  # a sentence longer than the window
            blocks.append((cur_start, cur_start + budget))
            cur_start += budget
        cur_end = b
    if cur_end > cur_start:
        blocks.append((cur_start, cur_end))
    return blocks


def stitch_blocks(block_offsets, block_probs, block_scores):
    """Stitch per-block token outputs of one context back together.

    Args:
        block_offsets: list of (T_b, 2) int character offsets (into the full context) of the
            context tokens of each block.
        block_probs: list of (T_b,) keep probabilities.
        block_scores: (n_blocks,) reranking logits.

    Returns:
        ``(offsets (T, 2), probs (T,), score)``: tokens of all blocks in text order and the
        maximum reranking score over blocks.
    """
    if len(block_offsets) != len(block_probs) or len(block_probs) != len(block_scores):
        raise ValueError("block_offsets, block_probs and block_scores must have equal length")
    if len(block_scores) == 0:
        raise ValueError("at least one block is needed")
    off = np.concatenate([np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in block_offsets])
    probs = np.concatenate([_as_numpy(p).astype(np.float32).reshape(-1) for p in block_probs])
    order = np.argsort(off[:, 0], kind="stable")
    return off[order], probs[order], float(np.max(np.asarray(block_scores, dtype=np.float64)))


def assemble_pruned(text: str, sentence_spans, keep) -> str:
    """Join the kept sentences using only exact substrings of ``text``.

    Kept sentence i contributes ``text[start_i:end_i]``. Between two kept sentences one of the
    original separators is inserted: the one that follows the first sentence, unless only the
    one that precedes the second contains a line break (so titles and paragraph breaks survive).
    Runs of adjacent kept sentences therefore come out verbatim.

    Args:
        text: the context. sentence_spans: (S, 2) character spans. keep: (S,) bool.
    """
    spans = np.asarray(sentence_spans, dtype=np.int64).reshape(-1, 2)
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    if keep.shape[0] != spans.shape[0]:
        raise ValueError(f"keep has {keep.shape[0]} entries for {spans.shape[0]} sentences")
    idx = np.flatnonzero(keep).tolist()
    parts = []
    for j, i in enumerate(idx):
        if j > 0:
            prev = idx[j - 1]
            after_prev = text[spans[prev, 1] : spans[prev + 1, 0]]
            before_next = text[spans[i - 1, 1] : spans[i, 0]]
            has_nl = ("\n" in after_prev) or ("\n" not in before_next)
            parts.append(after_prev if has_nl else before_next)
        parts.append(text[spans[i, 0] : spans[i, 1]])
    return "".join(parts)


def compression(original: str, pruned: str) -> float:
    """Share of characters removed, in [0, 1] (0 for an empty original)."""
    return 0.0 if not original else 1.0 - len(pruned) / len(original)


def kept_token_count(token_spans, keep) -> int:
    """Tokens inside the kept sentences.

    Args:
        token_spans: (S, 2) int token spans ``[start, end)`` of the sentences.
        keep: (S,) bool.
    """
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    return int((spans[keep, 1] - spans[keep, 0]).sum())


# ----------------------------------------------------------------------------------------
# the token budget rule
# ----------------------------------------------------------------------------------------
def sentence_scores(token_probs, spans) -> np.ndarray:
    """Score of each sentence for the budget rule: the mean keep probability of its tokens.

    Args:
        token_probs: (T,) keep probabilities. spans: (S, 2) token spans ``[start, end)``.

    Returns:
        (S,) float64; ``-inf`` for a sentence without tokens (never selected).
    """
    p = _as_numpy(token_probs).astype(np.float64).reshape(-1)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    csum = np.concatenate([[0.0], np.cumsum(p)])
    n = sp[:, 1] - sp[:, 0]
    total = csum[sp[:, 1]] - csum[sp[:, 0]]
    return np.where(n > 0, total / np.maximum(n, 1), -np.inf)


def budget_sentences(scores, lengths, *, groups=None, group_budgets=None, total_budget: int | None = None):
    """Choose sentences under token budgets: the highest-scoring sentences that fit.

    Sentences are visited by score, best first (ties: lower index first); a sentence is kept
    when its tokens fit in what is left of its group's budget and of the total budget, and
    skipped otherwise (a shorter one further down may still fit). The result is therefore the
    feasible set whose membership, read in score order, is lexicographically largest. Kept
    sentences keep their original order (the mask is indexed like the input).

    Args:
        scores: (N,) float sentence scores (``-inf``: never kept; ``+inf``: kept first).
        lengths: (N,) int tokens per sentence (0-token sentences are never kept).
        groups: (N,) int in [0, G) — the document of each sentence (default: all in group 0).
        group_budgets: (G,) int token budget per document (None: unbounded).
        total_budget: token budget over all sentences (None: unbounded).

    Returns:
        (N,) bool keep mask with, per group g, ``lengths[keep & groups == g].sum() <=
        group_budgets[g]`` and ``lengths[keep].sum() <= total_budget``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = scores.shape[0]
    if lengths.shape[0] != n:
        raise ValueError(f"scores has {n} entries but lengths has {lengths.shape[0]}")
    if np.isnan(scores).any():
        raise ValueError("scores contains NaN")
    if (lengths < 0).any():
        raise ValueError("lengths must be >= 0")
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64).reshape(-1)
    n_groups = int(groups.max()) + 1 if n else 0
    if groups.shape[0] != n or (n and groups.min() < 0):
        raise ValueError("groups must be (N,) non-negative ints")
    if group_budgets is None:
        left = np.full(max(n_groups, 1), np.iinfo(np.int64).max, dtype=np.int64)
    else:
        left = np.array(group_budgets, dtype=np.int64).reshape(-1)
        if left.shape[0] < n_groups or (left < 0).any():
            raise ValueError(f"group_budgets needs {n_groups} non-negative entries, got {left.tolist()}")
    if total_budget is not None and total_budget < 0:
        raise ValueError(f"total_budget must be >= 0, got {total_budget}")
    total_left = np.iinfo(np.int64).max if total_budget is None else int(total_budget)
    keep = np.zeros(n, dtype=bool)
    for i in rank_order(scores).tolist():
        size, g = int(lengths[i]), int(groups[i])
        if scores[i] == -np.inf or size == 0:
            continue
        if size <= left[g] and size <= total_left:
            keep[i] = True
            left[g] -= size
            total_left -= size
    return keep


# ----------------------------------------------------------------------------------------
# the released process() input / output shapes
# ----------------------------------------------------------------------------------------
def batch_inputs(question, context) -> tuple[list[str], list[list[str]], str]:
    """Bring the released ``process()`` inputs to ``(questions, contexts per question, shape)``.

    ``(str, str)`` -> shape ``"scalar"``; ``(str, [str])`` -> ``"one_query"``; ``([q], [str])``
    of equal length -> ``"pairs"`` (one context per question); ``([q], [[str]])`` -> ``"nested"``.
    """
    if isinstance(question, str):
        if isinstance(context, str):
            return [question], [[context]], "scalar"
        if isinstance(context, Sequence) and all(isinstance(c, str) for c in context):
            return [question], [list(context)], "one_query"
        raise TypeError("with a single question, context must be a str or a list of str")
    if not isinstance(question, Sequence) or not all(isinstance(q, str) for q in question):
        raise TypeError("question must be a str or a list of str")
    if not isinstance(context, Sequence) or isinstance(context, str):
        raise TypeError("with a list of questions, context must be a list (of lists) of str")
    if len(context) != len(question):
        raise ValueError(f"{len(question)} questions but {len(context)} context lists")
    if all(isinstance(c, str) for c in context):
        return list(question), [[c] for c in context], "pairs"
    if all(isinstance(c, Sequence) and not isinstance(c, str) for c in context):
        return list(question), [list(c) for c in context], "nested"
    raise TypeError("context must be a list of str or a list of lists of str")


def batch_titles(title, contexts: list[list[str]], shape: str) -> list[list]:
    """Titles nested like ``contexts``: ``"first_sentence"``, ``None`` or a title string each."""
    if title is None or title == "first_sentence":
        return [[title] * len(c) for c in contexts]
    if isinstance(title, str):
        if shape in ("scalar", "pairs") or sum(map(len, contexts)) == 1:
            return [[title] * len(c) for c in contexts]
        raise ValueError("a single title string needs a single context")
    if shape == "scalar":
        raise TypeError("title must be a str, None or 'first_sentence' for one context")
    if shape == "one_query":
        title = [title]
    if shape == "pairs":
        title = [[t] for t in title]
    if len(title) != len(contexts) or any(len(t) != len(c) for t, c in zip(title, contexts)):
        raise ValueError("titles must have the same nested structure as the contexts")
    return [list(t) for t in title]


def shape_outputs(rows: list[list[dict]], shape: str, keys: Sequence[str], *, reorder: bool, top_k: int) -> dict:
    """Per-context result dicts (nested per question) -> the released output shapes.

    With ``reorder`` each question's contexts are sorted by ``reranking_score`` (descending,
    ties by position), cut to ``top_k``, and ``context_index`` holds their original positions.
    """
    order = [list(range(len(row))) for row in rows]
    if reorder:
        order = [sorted(o, key=lambda i, row=row: -row[i]["reranking_score"])[:top_k] for o, row in zip(order, rows)]
        rows = [[row[i] for i in o] for o, row in zip(order, rows)]
    if shape == "scalar":
        return {k: rows[0][0][k] for k in keys} if rows[0] else {k: None for k in keys}
    if shape == "one_query":
        res = {k: [d[k] for d in rows[0]] for k in keys}
        if reorder:
            res["context_index"] = order[0]
        return res
    if shape == "pairs" and not reorder:
        return {k: [row[0][k] for row in rows] for k in keys}
    res = {k: [[d[k] for d in row] for row in rows] for k in keys}
    if reorder:
        res["context_index"] = order
    return res
