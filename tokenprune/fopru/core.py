"""FoPru math: scores, selection, any-res and merged-grid mappings, prompt compaction.

Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models"
(arXiv 2411.14164). Training-free, three stages:

1. significance: :func:`fopru_scores` turns vision-encoder attention into one score per
   patch token;
2. pruning: :func:`fopru_select` keeps ``K`` tokens with a global ``"rank"`` strategy or a
   local ``"row"`` strategy over the patch grid;
3. reorder: the kept indices are returned sorted ascending (raster order) so the LLM sees the
   surviving tokens in their original order.

Everything here is tensors in, tensors out: no model, no transformers import, no hooks (those
live in :mod:`tokenprune.fopru.capture` and :mod:`tokenprune.fopru.adapters`). Budgets follow
the one rule of :func:`prunecore.budget.keep_count` (``K = floor(keep * N + 0.5)`` or an int
count, at least 1); ties go to the lower index (:func:`prunecore.budget.torch_top_k`).

What the paper fixes and what is reconstructed (a parameter here) is stated per function.

This module gathers the public names of the four modules that hold the math, one concern each:
:mod:`.scoring` (scores, selection, budget checks), :mod:`.grids` (merged grids, packed
sequences), :mod:`.anyres` (any-res layouts) and :mod:`.prompt` (prompt compaction).
"""

from __future__ import annotations

from .anyres import ANYRES_NORMS, NEWLINE_RULES, AnyResLayout, anyres_select, normalise_crop_scores, packed_select
from .grids import (
    merge_grid_scores,
    merged_scores_from_packed,
    packed_colmean,
    packed_patch_to_raster,
    window_merged_scores,
)
from .prompt import compact_tokens, image_keep_mask, prune_mm_inputs, shrink_prompt
from .scoring import (
    METHODS,
    ROW_MODES,
    STRATEGIES,
    check_float,
    check_token_keep,
    fopru_scores,
    fopru_select,
    per_image_keep,
    select_per_image,
)

__all__ = [
    "ANYRES_NORMS",
    "METHODS",
    "NEWLINE_RULES",
    "ROW_MODES",
    "STRATEGIES",
    "AnyResLayout",
    "anyres_select",
    "check_float",
    "check_token_keep",
    "compact_tokens",
    "fopru_scores",
    "fopru_select",
    "image_keep_mask",
    "merge_grid_scores",
    "merged_scores_from_packed",
    "normalise_crop_scores",
    "packed_colmean",
    "packed_select",
    "packed_patch_to_raster",
    "per_image_keep",
    "prune_mm_inputs",
    "select_per_image",
    "shrink_prompt",
    "window_merged_scores",
]
