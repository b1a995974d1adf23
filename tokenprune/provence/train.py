"""Training utilities for Provence pruners: silver labels, token labels, joint loss, trainer.

Record format (one JSON object per line in a JSONL file)::

    {"query": str, "sentences": [str, ...], "selected_sents": [int, ...],
     "teacher_score": float | null, "title": str | null}

``selected_sents`` are the indices (into ``sentences``) of the sentences needed to answer the
query; ``[]`` means the passage is irrelevant (every token labelled "drop"). With an
instruction LLM, labels come from :data:`LABEL_PROMPT` + :func:`parse_cited_sentences` (the
paper's "answer oracle" recipe); for extractive QA data (SQuAD format) the sentences
overlapping the gold answer span are selected (:func:`squad_records`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prunecore.device import resolve_device
from prunecore.io import atomic_path

from .core import normalize_query, token_sentence_spans
from .sentences import split_sentences

__all__ = [
    "LABEL_PROMPT",
    "format_label_prompt",
    "parse_cited_sentences",
    "read_jsonl",
    "write_jsonl",
    "join_sentences",
    "encode_record",
    "collate",
    "provence_loss",
    "train_provence",
    "squad_records",
    "split_articles",
]

#: The "answer oracle" silver-labelling prompt (paraphrasing the paper's recipe).
LABEL_PROMPT = (
    "Answer the question using only the passage below. The passage is split into numbered "
    "sentences. After every statement of your answer, cite the sentence numbers that support "
    "it in square brackets, e.g. [0] or [1, 3]. If the passage does not contain the answer, "
    'reply exactly "No answer".\n\n'
    "Question: {query}\n\nPassage:\n{numbered}\n\nAnswer:"
)
_CITATION = re.compile(r"\[([\d, ]+)\]")


def format_label_prompt(query: str, sentences: Sequence[str], title: str | None = None) -> str:
    """Fill :data:`LABEL_PROMPT`; sentence ``i`` is shown as ``[i] text`` (title first if any)."""
    lines = ([f"Title: {title}"] if title else []) + [f"[{i}] {s}" for i, s in enumerate(sentences)]
    return LABEL_PROMPT.format(query=query, numbered="\n".join(lines))


def parse_cited_sentences(answer: str, n_sentences: int | None = None) -> list[int] | None:
    """Parse an LLM answer into selected sentence indices.

    Returns ``[]`` for "No answer", the sorted unique cited ids otherwise, and ``None`` when the
    answer is unparseable (no citation, or an id out of range): such records are dropped.
    """
    if answer.strip().lower().rstrip(".").startswith("no answer"):
        return []
    found = _CITATION.findall(answer)
    ids = set()
    for group in found:
        for tok in group.replace(" ", ",").split(","):
            if tok:
                ids.add(int(tok))
    if not ids:
        return None
    if n_sentences is not None and max(ids) >= n_sentences:
        return None
    return sorted(ids)


def write_jsonl(records: Iterable[dict], path) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def join_sentences(sentences: Sequence[str], title: str | None = None):
    """Context text and character spans: the title on its own line, sentences joined by spaces.

    Returns ``(text, spans (S', 2), offset)`` where ``offset`` is 1 when a title is the first
    span (so record sentence ``i`` is span ``i + offset``).
    """
    parts, spans, pos = [], [], 0
    if title:
        parts.append(title + "\n")
        spans.append((0, len(title)))
        pos = len(title) + 1
    for i, s in enumerate(sentences):
        if i:
            parts.append(" ")
            pos += 1
        parts.append(s)
        spans.append((pos, pos + len(s)))
        pos += len(s)
    return "".join(parts), np.asarray(spans, dtype=np.int64).reshape(-1, 2), int(bool(title))


def encode_record(tokenizer, record: dict, max_length: int = 512) -> dict:
    """Tokenise one record into model inputs and token labels.

    Labels: 1 on context tokens of selected sentences, 0 on other context tokens, -100 on the
    query, special and padding tokens (ignored by the loss).
    """
    text, spans, off0 = join_sentences(record["sentences"], record.get("title"))
    enc = tokenizer(
        normalize_query(record["query"]),
        text,
        truncation="only_second",
        max_length=max_length,
        return_offsets_mapping=True,
    )
    seq = np.asarray(enc.sequence_ids(), dtype=object)
    ctx = np.flatnonzero(seq == 1)
    labels = np.full(len(enc["input_ids"]), -100, dtype=np.int64)
    labels[ctx] = 0
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64)[ctx]
    tok_spans = token_sentence_spans(offsets, spans)
    for i in record.get("selected_sents", []):
        a, b = tok_spans[int(i) + off0]
        labels[ctx[a:b]] = 1
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels.tolist()}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    ts = record.get("teacher_score")
    out["teacher_score"] = float("nan") if ts is None else float(ts)
    return out


def collate(items: Sequence[dict], pad_id: int = 0) -> dict:
    """Pad encoded records into tensors (B, T)."""
    T = max(len(x["input_ids"]) for x in items)
    B = len(items)
    batch = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "labels": torch.full((B, T), -100, dtype=torch.long),
    }
    if "token_type_ids" in items[0]:
        batch["token_type_ids"] = torch.zeros((B, T), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        for k in batch:
            batch[k][i, :n] = torch.as_tensor(x[k])
    batch["teacher_score"] = torch.tensor([x["teacher_score"] for x in items], dtype=torch.float32)
    return batch


def provence_loss(token_logits, labels, rank_logits=None, teacher_scores=None, rank_weight: float = 0.05):
    """Joint Provence loss: token cross-entropy + ``rank_weight`` x MSE(score, teacher).

    Args:
        token_logits: (B, T, 2). labels: (B, T) int, -100 ignored.
        rank_logits: (B,) reranking logits; teacher_scores: (B,) floats, NaN where absent.

    Returns:
        ``(loss, token_ce, rank_mse)`` scalars (``rank_mse`` is 0 without teacher scores).
    """
    if token_logits.shape[:2] != labels.shape or token_logits.shape[-1] != 2:
        raise ValueError(f"token_logits {tuple(token_logits.shape)} vs labels {tuple(labels.shape)}")
    ce = F.cross_entropy(token_logits.float().reshape(-1, 2), labels.reshape(-1), ignore_index=-100)
    if not torch.isfinite(ce):  # no labelled token in the batch
        ce = token_logits.sum() * 0.0
    mse = ce.new_zeros(())
    if rank_logits is not None and teacher_scores is not None:
        have = torch.isfinite(teacher_scores)
        if have.any():
            mse = F.mse_loss(rank_logits.float()[have], teacher_scores.float()[have])
    return ce + rank_weight * mse, ce.detach(), mse.detach()


def train_provence(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    max_length: int = 256,
    batch_size: int = 16,
    lr: float = 5e-5,
    steps: int | None = None,
    epochs: float = 1.0,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    rank_weight: float = 0.05,
    seed: int = 0,
    device="cpu",
    head_lr: float | None = None,
    freeze_embeddings: bool = False,
    trainable_layers: int | None = None,
    log_every: int = 0,
    log=print,
    callback=None,
) -> list[float]:
    """Plain torch training loop (AdamW, linear warmup + linear decay).

    ``freeze_embeddings`` keeps the input embedding matrix fixed (much cheaper on CPU).
    ``trainable_layers=N`` freezes the embeddings and all but the top N encoder layers (the
    pooler and both heads stay trainable): backward then stops N layers down.
    ``head_lr`` (default ``lr``) is the learning rate of the freshly initialised heads
    (``token_classifier`` and the ranking ``classifier``).
    ``callback(step, losses)`` runs after every step; returning True stops training early.
    Returns the per-step losses. The model is left in eval mode.
    """
    if not records:
        raise ValueError("no training records")
    g = torch.Generator().manual_seed(seed)
    device = resolve_device(device)
    encoded = [encode_record(tokenizer, r, max_length) for r in records]
    n_steps = steps or max(1, math.ceil(len(encoded) * epochs / batch_size))
    model.to(device).train()
    if freeze_embeddings or trainable_layers is not None:
        model.ranker.get_input_embeddings().weight.requires_grad_(False)
    if trainable_layers is not None:
        _freeze_lower_layers(model, trainable_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    head_ids = {
        id(p)
        for n, p in model.named_parameters()
        if n.startswith("token_classifier.") or ".classifier." in n or n.startswith("ranker.classifier.")
    }
    groups = [
        {"params": [p for p in params if id(p) not in head_ids], "lr": lr},
        {"params": [p for p in params if id(p) in head_ids], "lr": head_lr or lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay)
    n_warm = int(warmup * n_steps)

    def lr_factor(s: int) -> float:
        if s < n_warm:
            return (s + 1) / n_warm
        return max(0.0, (n_steps - s) / max(1, n_steps - n_warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    pad_id = tokenizer.pad_token_id or 0
    losses, perm, pos = [], torch.randperm(len(encoded), generator=g), 0
    for step in range(n_steps):
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(encoded), generator=g), 0
        idx = perm[pos : pos + batch_size].tolist()
        pos += batch_size
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        rank, tok = model(**inputs)
        loss, ce, mse = provence_loss(tok, batch["labels"], rank, batch["teacher_score"], rank_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log(
                f"step {step + 1}/{n_steps} loss {np.mean(losses[-log_every:]):.4f} "
                f"ce {float(ce):.4f} mse {float(mse):.3f}"
            )
        if callback is not None and callback(step + 1, losses):
            break
    model.eval()
    return losses


def _freeze_lower_layers(model, n_trainable: int) -> None:
    base = model.ranker.base_model
    n_layers = int(model.config.num_hidden_layers)
    stacks = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if not stacks:
        raise ValueError("could not find the encoder layer list to freeze")
    for p in base.parameters():
        p.requires_grad_(False)
    for layer in list(stacks[0])[max(0, n_layers - n_trainable) :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for name, module in base.named_children():  # pooler / final norm after the layers
        if name in ("pooler", "final_norm", "norm"):
            for p in module.parameters():
                p.requires_grad_(True)


# ------------------------------------------------------------------ extractive QA -> records
def split_articles(n_articles: int, *, test_fraction: float = 0.2, seed: int = 0):
    """Deterministic article-level split: ``(train_ids, test_ids)`` sorted int arrays."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_articles)
    n_test = max(1, int(round(test_fraction * n_articles)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def squad_records(
    squad: dict,
    *,
    article_ids=None,
    window=(3, 7),
    negatives: int = 1,
    positive_score: float | None = 4.0,
    negative_score: float | None = -4.0,
    max_answer_sentences: int = 4,
    seed: int = 0,
) -> list[dict]:
    """Silver records from a SQuAD-format dict (e.g. COVID-QA).

    Each question gives one positive passage (a window of ``window`` consecutive sentences of its
    article that contains the sentence(s) overlapping the gold answer span, at a random place)
    and ``negatives`` passages from the same article without them (``selected_sents=[]``).
    Teacher scores are pseudo-scores from the gold label (``positive_score`` /
    ``negative_score``; None to train the token head only).

    Extra keys: ``article`` (index), ``answer`` (gold text), ``question_id``.
    """
    rng = np.random.default_rng(seed)
    lo, hi = (window, window) if isinstance(window, int) else window
    out = []
    for art_i, art in enumerate(squad["data"]):
        if article_ids is not None and art_i not in set(np.asarray(article_ids).tolist()):
            continue
        for para in art["paragraphs"]:
            text = para["context"]
            spans = np.asarray(split_sentences(text), dtype=np.int64).reshape(-1, 2)
            S = len(spans)
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa.get("answers"):
                    continue
                ans = qa["answers"][0]
                a0 = int(ans["answer_start"])
                a1 = a0 + len(ans["text"].rstrip())
                hit = np.flatnonzero((spans[:, 0] < a1) & (spans[:, 1] > a0))
                if len(hit) == 0 or len(hit) > max_answer_sentences:
                    continue
                k = int(rng.integers(lo, hi + 1))
                k = max(k, len(hit))
                first_min = max(0, hit[-1] - k + 1)
                first_max = min(hit[0], S - k)
                if first_max < first_min:
                    first_min = first_max = max(0, min(hit[0], S - k))
                start = int(rng.integers(first_min, first_max + 1))
                win = np.arange(start, min(S, start + k))
                sents = [text[a:b] for a, b in spans[win]]
                sel = [int(i - start) for i in hit if start <= i < start + k]
                base = {
                    "query": qa["question"],
                    "title": None,
                    "article": art_i,
                    "question_id": qa.get("id"),
                    "answer": ans["text"].strip(),
                }
                out.append(dict(base, sentences=sents, selected_sents=sel, teacher_score=positive_score))
                for _ in range(negatives):
                    free = [s for s in range(0, max(1, S - k + 1)) if s + k <= hit[0] or s > hit[-1]]
                    if not free:
                        break
                    s0 = int(rng.choice(free))
                    neg = [text[a:b] for a, b in spans[s0 : s0 + k]]
                    out.append(dict(base, sentences=neg, selected_sents=[], teacher_score=negative_score))
    return out
