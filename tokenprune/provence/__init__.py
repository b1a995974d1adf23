"""Provence (Chirkova et al., ICLR 2025): query-aware RAG context pruning + reranking.

Modules: :mod:`.core` (pure steps: sentence rounding, token->sentence spans, title rule,
blocks, assembly), :mod:`.sentences` (rule-based splitter), :mod:`.model` (the model,
checkpoint loading/saving, :class:`ProvencePruner`), :mod:`.train` (silver labels, loss,
training loop). Importing this package loads torch but not transformers.
"""

from .core import (
    MODES,
    apply_title_rule,
    assemble_pruned,
    budget_sentences,
    compression,
    normalize_query,
    plan_blocks,
    provence_sentences,
    sentence_scores,
    stitch_blocks,
    token_sentence_spans,
)
from .model import ProvenceModel, ProvencePruner, load_provence_model, save_provence_model
from .sentences import sentence_texts, split_sentences

__all__ = [
    "MODES",
    "ProvenceModel",
    "ProvencePruner",
    "apply_title_rule",
    "assemble_pruned",
    "budget_sentences",
    "compression",
    "load_provence_model",
    "normalize_query",
    "plan_blocks",
    "provence_sentences",
    "save_provence_model",
    "sentence_scores",
    "sentence_texts",
    "split_sentences",
    "stitch_blocks",
    "token_sentence_spans",
]
