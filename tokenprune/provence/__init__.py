"""Provence (Chirkova et al., ICLR 2025): query-aware RAG context pruning + reranking.

Modules: :mod:`.core` (pure steps: sentence rounding, token->sentence spans, title rule,
blocks, assembly), :mod:`.sentences` (rule-based splitter), :mod:`.network` (the model and
its heads), :mod:`.checkpoint` (layouts, loading, saving), :mod:`.budget` (the token budget
rule), :mod:`.pruner` (:class:`ProvencePruner`), :mod:`.result` (:class:`ProvenceResult`),
:mod:`.model` (the historical import path of all of these), :mod:`.train` (silver labels,
loss, training loop). Importing this package loads torch but not transformers.
"""

from .checkpoint import load_provence_model, save_provence_model
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
from .network import ProvenceModel
from .pruner import ProvencePruner
from .result import ProvenceResult
from .sentences import sentence_texts, split_sentences

__all__ = [
    "MODES",
    "ProvenceModel",
    "ProvencePruner",
    "ProvenceResult",
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
