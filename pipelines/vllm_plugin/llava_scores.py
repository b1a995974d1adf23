"""LLaVA's side of the vLLM plugin that needs no vLLM (pure torch): the CLS attention row
recomputed from one CLIP layer's ``q`` and ``k``, and each image's kept placeholder count."""

from __future__ import annotations

import torch

from .options import served_token_count

__all__ = ["LLAVA_METHODS", "PREFIXES", "cls_attention_rows", "feature_prefix", "kept_run_length"]

LLAVA_METHODS = ("cls",)  # CLIP towers: FoPru's CLS rule (its default for LLaVA)
PREFIXES = {"default": 0, "full": 1}  # vision_feature_select_strategy -> CLS features kept in front


def cls_attention_rows(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The CLS query's attention row of one encoder layer.

    q, k: ``(B, N, heads * d)`` projections (token 0 is CLS) -> ``(B, heads, N)`` float32
    ``softmax(q_0 k^T * scale)`` per head (unmasked: CLIP attends over all tokens).
    """
    b, n, dim = q.shape
    d = dim // num_heads
    q0 = q[:, :1].float().view(b, 1, num_heads, d).transpose(1, 2) * scale  # (B, heads, 1, d)
    kt = k.float().view(b, n, num_heads, d).permute(0, 2, 3, 1)  # (B, heads, d, N)
    return torch.softmax(q0 @ kt, dim=-1)[:, :, 0]


def kept_run_length(n_run: int, n_patch: int, keep: float | int) -> int:
    """Placeholder tokens of one image after pruning: its ``n_run - n_patch`` prefix (CLS)
    features plus ``served_token_count(n_patch, keep)`` patches."""
    return n_run - n_patch + served_token_count(n_patch, keep)


def feature_prefix(hf_config) -> int:
    """CLS features in front of the patches for the config's feature strategy (refuses the rest)."""
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in PREFIXES:
        raise ValueError(
            f"prunekit vLLM plugin: vision_feature_select_strategy={strategy!r} has no patch tokens to prune; "
            f"serve a model with one of {list(PREFIXES)} or drop the prunekit option"
        )
    return PREFIXES[strategy]
