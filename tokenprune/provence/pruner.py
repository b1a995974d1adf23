"""The Provence pruner: :class:`ProvencePruner` (the released ``process()`` API).

:meth:`ProvencePruner.score` windows each context (sentences packed into blocks with the query
repeated), runs the model on the (query, block) pairs in length-sorted batches and stitches the
blocks back; :meth:`ProvencePruner.decide` applies the threshold rule or the token budget rule
(:mod:`tokenprune.provence.budget`) and returns a :class:`~tokenprune.provence.result.ProvenceResult`.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from prunecore.device import resolve_device, resolve_dtype
from tokenprune.stats import TokenStats

from .budget import budget_keeps, call_budgets, check_candidates, check_int_budget, token_counter
from .checkpoint import check_fast_tokenizer, check_window, load_provence_model
from .core import (
    MODES,
    apply_title_rule,
    batch_inputs,
    batch_titles,
    kept_token_count,
    normalize_query,
    plan_blocks,
    provence_sentences,
    shape_outputs,
    stitch_blocks,
    token_sentence_spans,
)
from .network import ProvenceModel
from .result import RESULT_KEYS, ProvenceResult, context_fields
from .sentences import split_sentences

__all__ = ["ProvencePruner"]


class ProvencePruner:
    """Prune and rerank RAG contexts with a Provence model.

    Safe to call from many threads at once: every thread encodes with its own copy of the
    tokenizer (a fast tokenizer's truncation/padding settings are state that each call
    changes), and the model is only read. Picklable (the per-thread copies are dropped).

    Args:
        model_or_path: a :class:`ProvenceModel`, or a folder / cached hub id to load.
        tokenizer: a fast tokenizer (required when a model object is passed).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...
        dtype: ``"auto"`` (bf16/fp16 on CUDA, fp32 on CPU), or a torch dtype / name.
        max_length: window in tokens (query + context + special tokens), at most the
            backbone's position limit; longer contexts are split into blocks with the query
            repeated. Default: the window saved with the checkpoint (prunekit marker or
            OpenProvence ``max_length``), else ``min(512, position limit)`` — never the
            generation default ``PretrainedConfig.max_length`` (20).
        sentence_splitter: ``text -> list[(start, end)]`` character spans (default: the
            rule-based :func:`tokenprune.provence.sentences.split_sentences`).
        mode: sentence rule of :func:`tokenprune.provence.core.provence_sentences`.
        max_query_tokens: queries longer than this are truncated (default: half the window).
    """

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        *,
        device="auto",
        dtype="auto",
        max_length: int | None = None,
        sentence_splitter: Callable[[str], list] = split_sentences,
        mode: str = "decision_average",
        max_query_tokens: int | None = None,
    ):
        meta: dict[str, Any] = {}
        #: the folder / hub id the model was loaded from (None for an in-memory model)
        self.source = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
        if isinstance(model_or_path, (str, os.PathLike)):
            model, loaded_tok, meta = load_provence_model(model_or_path)
            tokenizer = tokenizer or loaded_tok
        elif isinstance(model_or_path, ProvenceModel):
            model = model_or_path
            if tokenizer is None:
                raise ValueError("a tokenizer is required when a ProvenceModel object is passed")
        else:
            raise TypeError(
                f"model_or_path must be a ProvenceModel or a path / hub id, got {type(model_or_path).__name__}"
            )
        check_fast_tokenizer(tokenizer)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.n_special = int(tokenizer.num_special_tokens_to_add(pair=True))
        self.max_length = check_window(max_length, meta.get("window"), model.config, self.n_special)
        self.max_query_tokens = int(max_query_tokens or (self.max_length - self.n_special) // 2)
        self.sentence_splitter = sentence_splitter
        self.mode = mode
        self._local = threading.local()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def thread_tokenizer(self):
        """This thread's own copy of the tokenizer (made on first use in the thread)."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    # -- token probabilities ----------------------------------------------------------------
    def _prepare_query(self, question: str) -> tuple[str, int]:
        tok = self.thread_tokenizer()
        q = normalize_query(question)
        # verbose=False: a long query is truncated here, so transformers' "longer than the
        # maximum sequence length" warning would be false
        enc = tok(q, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        if len(ids) > self.max_query_tokens:
            q = q[: enc["offset_mapping"][self.max_query_tokens - 1][1]]
            ids = tok(q, add_special_tokens=False, verbose=False)["input_ids"]
        return q, len(ids)

    @torch.inference_mode()
    def _run_pairs(self, queries: list[str], texts: list[str], batch_size: int):
        """Run the model on (query, text) pairs.

        Returns ``(per pair: (offsets (T_c, 2) into text, keep probs (T_c,), rank logit),
        number of forward passes)``.
        """
        tok = self.thread_tokenizer()
        results: list[Any] = [None] * len(texts)
        lengths = np.array([len(q) + len(t) for q, t in zip(queries, texts)])
        order = np.argsort(-lengths, kind="stable")
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size].tolist()
            enc = tok(
                [queries[i] for i in idx],
                [texts[i] for i in idx],
                padding=True,
                truncation="only_second",
                max_length=self.max_length,
                return_offsets_mapping=True,
                return_tensors="pt",
            )
            offsets = enc.pop("offset_mapping").numpy()
            inputs = {
                k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            rank, tok_logits = self.model(**inputs)
            probs = torch.softmax(tok_logits.float(), dim=-1)[..., 1].cpu().numpy()
            rank = rank.float().cpu().numpy()
            for row, i in enumerate(idx):
                ctx = np.asarray(enc.sequence_ids(row), dtype=object) == 1
                results[i] = (offsets[row][ctx], probs[row][ctx], float(rank[row]))
        return results, -(-len(order) // batch_size)

    # -- public API -------------------------------------------------------------------------
    def process(
        self,
        question,
        context,
        title="first_sentence",
        batch_size: int = 32,
        threshold: float = 0.1,
        always_select_title: bool = False,
        reorder: bool = False,
        top_k: int = 5,
        enable_warnings: bool = True,
        *,
        mode: str | None = None,
        keep: float | int | None = None,
        target_total_tokens: int | None = None,
        budget_tokenizer=None,
        target_tokens: int | None = None,
        target_ratio: float | None = None,
    ) -> ProvenceResult:
        """Prune (and optionally rerank) contexts for questions.

        The signature up to ``enable_warnings`` is the released one (positional order
        included). Shapes: ``(str, str)`` -> scalars; ``(str, [str, ...])`` -> one list;
        ``([q, ...], [[ctx, ...], ...])`` -> nested lists (one list per question);
        ``([q, ...], [ctx, ...])`` of equal length -> one context per question, lists.

        Args:
            title: ``"first_sentence"`` (the first sentence of each context is its title),
                ``None`` (no title), or title text(s) matching the contexts' structure: a given
                title is placed before its context (``title + "\\n" + context``) and can then
                appear in the output.
            threshold, mode: the threshold rule, see
                :func:`tokenprune.provence.core.provence_sentences`.
            always_select_title: keep the title iff another sentence is kept.
            reorder: sort each question's contexts by reranking score (descending) and keep
                ``top_k``.
            enable_warnings: warn about a question that is empty after normalisation.
            keep: the token budget of each context, used instead of the threshold rule: a
                fraction in (0, 1] of the context's tokens (``keep_count(T, keep)`` of T
                tokens) or an int token count. The highest-scoring sentences (mean keep
                probability) that fit are kept (:func:`tokenprune.provence.core.budget_sentences`;
                tokens are the model's unless ``budget_tokenizer`` is given). ``keep=1`` is a
                one-token budget, not "keep all" (that is ``keep=1.0``): an int ``keep`` smaller
                than every sentence raises a ValueError saying so. A bad ``keep`` raises the
                error of :func:`prunecore.budget.check_keep`, as in every method.
            target_total_tokens: a second budget, over all contexts of a question (an int
                token count; with ``keep`` both hold). With ``reorder``, the budgets are spent
                on the ``top_k`` contexts that are returned (highest reranking scores), so a
                total budget is not lost on contexts that are cut. A total smaller than every
                sentence warns (everything would be pruned to nothing).
            target_tokens, target_ratio: deprecated spellings of ``keep=<int>`` and
                ``keep=<fraction>`` (a DeprecationWarning; an int budget smaller than every
                sentence warns instead of raising). The score ``threshold`` is not a budget.
            budget_tokenizer: count the budgets in the generator's tokens instead of the
                pruner's: a Hugging Face tokenizer (counted without special tokens), a
                tokenizer folder, or a callable ``text -> number of tokens``. Sentences are
                counted one by one, and every pruned context is re-counted whole, so
                ``budget_tokenizer(pruned_context)`` never exceeds an int ``keep`` and the
                sum over a question's contexts never exceeds ``target_total_tokens``.

        Returns:
            a :class:`~tokenprune.provence.result.ProvenceResult`: per context
            ``pruned_context``, ``reranking_score``, ``kept_sentences``, ``kept_spans``,
            ``compression``, ``compression_rate``, ``token_compression`` (shaped like the
            input), ``context_index`` with ``reorder=True``, and ``stats`` (one
            :class:`~tokenprune.stats.TokenStats` of the call). ``result["key"]`` (the dict
            of earlier releases) works for one release with a DeprecationWarning.
        """
        scored = self.score(question, context, title=title, batch_size=batch_size, enable_warnings=enable_warnings)
        return self.decide(
            scored,
            threshold=threshold,
            always_select_title=always_select_title,
            reorder=reorder,
            top_k=top_k,
            mode=mode,
            keep=keep,
            target_total_tokens=target_total_tokens,
            budget_tokenizer=budget_tokenizer,
            target_tokens=target_tokens,
            target_ratio=target_ratio,
        )

    __call__ = process

    def score(
        self, question, context, *, title="first_sentence", batch_size: int = 32, enable_warnings: bool = True
    ) -> dict:
        """The model part of :meth:`process`: token keep probabilities and reranking scores.

        Returns an opaque dict for :meth:`decide` (so several rules can be applied to one
        forward pass); ``scored["items"][q][c]`` holds ``text``, ``sents`` (S, 2), ``offsets``
        (T, 2), ``probs`` (T,) and ``score`` of each context.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        questions, contexts, shape = batch_inputs(question, context)
        titles = batch_titles(title, contexts, shape)
        tok = self.thread_tokenizer()
        pairs_q, pairs_t, owners, per_ctx = [], [], [], []
        for qi, (q, ctxs) in enumerate(zip(questions, contexts)):
            qn, q_len = self._prepare_query(q)
            if enable_warnings and not qn:
                warnings.warn(
                    f"question {qi} is empty after normalisation ({q!r}): Provence scores the contexts "
                    "without a query, so pruning is not query-aware",
                    stacklevel=3,
                )
            budget = self.max_length - self.n_special - q_len
            for ci, ctx in enumerate(ctxs):
                if not isinstance(ctx, str):
                    raise TypeError(f"contexts must be str, got {type(ctx).__name__}")
                t = titles[qi][ci]
                given_title = t not in ("first_sentence", None)
                text = f"{t}\n{ctx}" if given_title else ctx
                sents = np.asarray(self.sentence_splitter(text), dtype=np.int64).reshape(-1, 2)
                # the whole text is tokenised only for its offsets, then split into windows
                # (plan_blocks): verbose=False silences transformers' false "will result in
                # indexing errors" warning for texts longer than the model's window
                enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
                off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
                tok_spans = token_sentence_spans(off, sents)
                blocks = plan_blocks(tok_spans[:, 0], len(off), budget)
                for a, b in blocks:
                    ca = 0 if a == 0 else int(off[a, 0])
                    cb = len(text) if b >= len(off) else int(off[b, 0])
                    pairs_q.append(qn)
                    pairs_t.append(text[ca:cb])
                    owners.append((len(per_ctx), ca))
                per_ctx.append(
                    {
                        "q": qi,
                        "c": ci,
                        "text": text,
                        "ctx": ctx,
                        "ctx_start": len(text) - len(ctx),
                        "sents": sents,
                        "title_idx": None if t is None or not len(sents) else 0,
                    }
                )
        raw, passes = self._run_pairs(pairs_q, pairs_t, batch_size) if pairs_q else ([], 0)
        grouped: list[list] = [[] for _ in per_ctx]
        for (k, ca), (off, probs, sc) in zip(owners, raw):
            grouped[k].append((off + ca, probs, sc))
        items = [[None] * len(c) for c in contexts]
        for k, info in enumerate(per_ctx):
            offs, probs, sc = stitch_blocks(*zip(*grouped[k]))
            info.update(offsets=offs, probs=probs, score=sc, n_blocks=len(grouped[k]))
            items[info["q"]][info["c"]] = info
        return {"items": items, "shape": shape, "forward_passes": passes}

    def decide(
        self,
        scored: dict,
        *,
        threshold: float = 0.1,
        always_select_title: bool = False,
        reorder: bool = False,
        top_k: int = 5,
        mode: str | None = None,
        keep: float | int | None = None,
        target_total_tokens: int | None = None,
        budget_tokenizer=None,
        budget_candidates=None,
        target_tokens: int | None = None,
        target_ratio: float | None = None,
    ) -> ProvenceResult:
        """The sentence part of :meth:`process`, applied to the output of :meth:`score`.

        ``budget_candidates``: for a single question, the indices of the contexts the token
        budgets are spent on (the others keep nothing), e.g. the ones a caller's ``top_k``
        will return. Default: with ``reorder``, the ``top_k`` best-scored contexts; else all.
        """
        mode = mode or self.mode
        keep_int, target_tokens, target_ratio = call_budgets(keep, target_tokens, target_total_tokens, target_ratio)
        budgeted = any(x is not None for x in (target_tokens, target_total_tokens, target_ratio))
        count = token_counter(budget_tokenizer)
        candidates = check_candidates(budget_candidates, scored["items"])
        out = []
        stats = TokenStats("provence", forward_passes=scored["forward_passes"], extras={"contexts": 0, "blocks": 0})
        for row in scored["items"]:
            spans = [token_sentence_spans(info["offsets"], info["sents"]) for info in row]
            if budgeted:
                chosen = candidates
                if chosen is None and reorder:
                    chosen = sorted(range(len(row)), key=lambda i, row=row: -row[i]["score"])[:top_k]
                keeps, shortest = budget_keeps(
                    row,
                    spans,
                    always_select_title,
                    target_tokens,
                    target_total_tokens,
                    target_ratio,
                    count=count,
                    candidates=chosen,
                )
                check_int_budget(shortest, keep_int, target_tokens, target_total_tokens)
            else:
                keeps = [
                    provence_sentences(info["probs"], sp, threshold=threshold, mode=mode)
                    for info, sp in zip(row, spans)
                ]
            new_row = []
            for info, sp, keep in zip(row, spans, keeps):
                keep = apply_title_rule(keep, title_index=info["title_idx"], always_select_title=always_select_title)
                n_kept = kept_token_count(sp, keep)
                stats = stats + TokenStats(
                    "provence",
                    tokens_in=len(info["offsets"]),
                    tokens_kept=n_kept,
                    extras={"contexts": 1, "blocks": info["n_blocks"]},
                )
                new_row.append(context_fields(info, keep, n_kept))
            out.append(new_row)
        return ProvenceResult(
            **shape_outputs(out, scored["shape"], RESULT_KEYS, reorder=reorder, top_k=top_k), stats=stats
        )
