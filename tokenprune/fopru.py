"""FoPru: focal pruning of visual tokens from the vision encoder's attention (pure functions).

Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models"
(arXiv 2411.14164). Training-free, three stages:

1. significance: :func:`fopru_scores` turns vision-encoder attention into one score per
   patch token;
2. pruning: :func:`fopru_select` keeps ``K`` tokens with a global ``"rank"`` strategy or a
   local ``"row"`` strategy over the patch grid;
3. reorder: the kept indices are returned sorted ascending (raster order) so the LLM sees the
   surviving tokens in their original order.

Everything here is tensors in, tensors out; no model, no transformers import.  Hooks that
obtain the attention from a Hugging Face model live in :mod:`tokenprune.fopru_hf`.

What the paper fixes and what is reconstructed (a parameter here) is stated per function.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

__all__ = [
    "fopru_scores",
    "fopru_select",
    "keep_to_count",
    "merge_grid_scores",
    "ROW_MODES",
    "STRATEGIES",
    "METHODS",
]

METHODS = ("cls", "colmean")
STRATEGIES = ("rank", "row")
ROW_MODES = ("rows", "per_row")


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")


def fopru_scores(attn: torch.Tensor, *, method: str = "cls", num_prefix: int | None = None) -> torch.Tensor:
    """Token significance from vision-encoder attention.

    Args:
        attn: attention probabilities of one encoder layer, one of
            ``(B, heads, N, N)`` — the full map (eager attention output), or
            ``(B, heads, N)`` — only the rows needed: for ``method="cls"`` the CLS query row
            ``A[:, :, 0, :]``; for ``method="colmean"`` the query-mean ``A.mean(2)``
            (what the hooks in :mod:`tokenprune.fopru_hf` compute without materialising N x N).
        method: ``"cls"`` (paper): ``s_j = mean_h A[h, 0, j]``, needs a CLS token at index 0.
            ``"colmean"`` (reconstruction): attention received, ``s_j = mean_h mean_i A[h, i, j]``;
            the option for CLS-free encoders (SigLIP, Qwen2-VL).
        num_prefix: leading non-patch tokens (CLS, registers) dropped from the output.
            Default: 1 for ``"cls"``, 0 for ``"colmean"``.

    Returns:
        ``(B, N - num_prefix)`` float32 scores of the patch tokens, in input order.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    _check_float(attn, "attn")
    if num_prefix is None:
        num_prefix = 1 if method == "cls" else 0
    if not isinstance(num_prefix, Integral) or num_prefix < 0:
        raise ValueError(f"num_prefix must be a non-negative int, got {num_prefix!r}")
    if attn.dim() == 4:
        b, h, nq, n = attn.shape
        if method == "cls":
            if nq != n:
                raise ValueError(f"4-D attn must be square (B, heads, N, N) for method='cls', got {tuple(attn.shape)}")
            rows = attn[:, :, 0, :]
        else:
            rows = attn.mean(dim=2)
    elif attn.dim() == 3:
        rows = attn
        n = attn.shape[-1]
    else:
        raise ValueError(f"attn must be (B, heads, N, N) or (B, heads, N), got shape {tuple(attn.shape)}")
    if method == "cls" and num_prefix < 1:
        raise ValueError("method='cls' needs the CLS token at index 0: num_prefix must be >= 1")
    if num_prefix >= n:
        raise ValueError(f"num_prefix={num_prefix} leaves no patch token out of N={n}")
    return rows.float().mean(dim=1)[:, num_prefix:]


def keep_to_count(n: int, keep) -> int:
    """Number of tokens to keep out of ``n``.

    ``keep`` is a fraction in (0, 1] (``K = round(keep * n)``) or an int count in [1, n].
    Raises ``ValueError`` when K would be 0 or exceed ``n``; ``TypeError`` for bools/others.
    """
    if isinstance(keep, bool):
        raise TypeError("keep must be a fraction in (0, 1] or an int count, not a bool")
    if isinstance(keep, Integral):
        k = int(keep)
        if k < 1 or k > n:
            raise ValueError(f"keep={k} tokens is out of range: need 1 <= keep <= N={n}")
        return k
    if isinstance(keep, Real):
        f = float(keep)
        if not math.isfinite(f) or f <= 0.0 or f > 1.0:
            raise ValueError(f"keep fraction must be in (0, 1], got {keep!r} (use an int for a count)")
        k = int(round(f * n))
        if k < 1:
            raise ValueError(f"keep={keep!r} of N={n} tokens rounds to K=0; pass a larger fraction or an int count")
        return min(k, n)
    raise TypeError(f"keep must be a float fraction or an int count, got {type(keep).__name__}")


def _desc_rank(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, rank) along the last dim, descending, ties broken by lower index."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return order, rank


def _mask_to_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    # nonzero() is row-major, hence ascending within each batch row (the reorder step).
    return mask.nonzero()[:, 1].view(mask.shape[0], k)


def fopru_select(
    scores: torch.Tensor,
    keep,
    *,
    strategy: str = "rank",
    grid: tuple[int, int] | None = None,
    row_mode: str = "rows",
) -> torch.Tensor:
    """Choose which patch tokens survive; returns ``(B, K)`` int64 indices sorted ascending.

    Args:
        scores: ``(B, N)`` significance (higher = keep), e.g. from :func:`fopru_scores`.
        keep: fraction in (0, 1] (``K = round(keep * N)``) or int count; exact K always.
        strategy: ``"rank"`` (paper, global view): the K highest-scoring tokens.
            ``"row"`` (paper, local view over the ``grid``); two readings (reconstruction):
            ``row_mode="rows"`` keeps the ``K // W`` whole rows with the largest summed
            score, then the best ``K % W`` tokens of the next-ranked row;
            ``row_mode="per_row"`` keeps the top ``K // H`` tokens in every row and one more
            in each of the ``K % H`` best rows.  Below one row's worth of tokens (``K < W``
            for ``"rows"``, ``K < H`` for ``"per_row"``) it falls back to ``"rank"``.
        grid: ``(H, W)`` patch grid with ``H * W == N`` (raster order); needed by ``"row"``.
        row_mode: see ``strategy``.

    Ties are broken toward the lower index, so the result is deterministic.
    """
    _check_float(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if row_mode not in ROW_MODES:
        raise ValueError(f"unknown row_mode {row_mode!r}; expected one of {ROW_MODES}")
    b, n = scores.shape
    if n == 0:
        raise ValueError("scores has no tokens (N=0)")
    k = keep_to_count(n, keep)

    if strategy == "row":
        if grid is None:
            raise ValueError("strategy='row' needs grid=(H, W)")
        try:
            h, w = (int(g) for g in grid)
        except (TypeError, ValueError):
            raise ValueError(f"grid must be a pair (H, W) of ints, got {grid!r}") from None
        if h < 1 or w < 1 or h * w != n:
            raise ValueError(f"grid {(h, w)} does not match N={n} tokens (H*W={h * w})")
        if (row_mode == "rows" and k < w) or (row_mode == "per_row" and k < h):
            strategy = "rank"
    elif grid is not None:
        gh, gw = grid
        if int(gh) * int(gw) != n:
            raise ValueError(f"grid {tuple(grid)} does not match N={n} tokens")

    if strategy == "rank":
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        return torch.sort(top, dim=-1).values

    g = scores.reshape(b, h, w)
    row_order, row_rank = _desc_rank(g.sum(dim=-1))  # (B, H)
    ar = torch.arange(b, device=scores.device)
    if row_mode == "rows":
        full, rem = divmod(k, w)
        mask = (row_rank < full)[:, :, None].expand(b, h, w).clone()
        if rem:
            part_row = row_order[:, full]  # (B,) the next-best row
            _, tok_rank = _desc_rank(g[ar, part_row])  # (B, W)
            mask[ar, part_row] = tok_rank < rem
    else:  # per_row
        base, rem = divmod(k, h)
        counts = base + (row_rank < rem).long()  # (B, H)
        _, tok_rank = _desc_rank(g)  # (B, H, W)
        mask = tok_rank < counts[:, :, None]
    return _mask_to_indices(mask.reshape(b, n), k)


def merge_grid_scores(scores: torch.Tensor, grid: tuple[int, int], merge: int = 2) -> torch.Tensor:
    """Pool patch scores onto a ``merge x merge`` merged-token grid (Qwen2-VL's 2x2 merger).

    Args:
        scores: ``(B, H*W)`` patch scores in raster order over ``grid=(H, W)``.
        grid: patch grid; both sides divisible by ``merge``.
        merge: spatial merge size.

    Returns:
        ``(B, (H/merge) * (W/merge))`` mean score per merged token, raster order over the
        merged grid (the order Qwen2-VL's merger emits after its window permutation is the
        caller's business).
    """
    _check_float(scores, "scores")
    h, w = (int(g) for g in grid)
    if scores.dim() != 2 or scores.shape[1] != h * w:
        raise ValueError(f"scores {tuple(scores.shape)} does not match grid {(h, w)}")
    if h % merge or w % merge:
        raise ValueError(f"grid {(h, w)} is not divisible by merge={merge}")
    b = scores.shape[0]
    x = scores.reshape(b, h // merge, merge, w // merge, merge)
    return x.mean(dim=(2, 4)).reshape(b, -1)
