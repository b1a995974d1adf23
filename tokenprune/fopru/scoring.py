"""FoPru scores and selection: :func:`fopru_scores` (vision attention -> one score per patch)
and :func:`fopru_select` (the ``"rank"`` / ``"row"`` strategies, exact ``K``, sorted indices),
with the shared checks of a score tensor and a per-image budget. Tensors in, tensors out."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch

from prunecore.budget import check_keep, keep_count, torch_rank, torch_top_k

METHODS = ("cls", "colmean")
STRATEGIES = ("rank", "row")
ROW_MODES = ("rows", "per_row")

__all__ = [
    "METHODS",
    "STRATEGIES",
    "ROW_MODES",
    "check_float",
    "check_token_keep",
    "per_image_keep",
    "fopru_scores",
    "fopru_select",
    "select_per_image",
]


def check_float(t: torch.Tensor, name: str, *, finite: bool = True) -> None:
    """Raise unless ``t`` is a floating-point tensor, finite when ``finite`` (that check is a
    host synchronisation: the adapters, which compute the scores themselves, skip it)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    if finite and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


# --------------------------------------------------------------------------- budget
def check_token_keep(keep) -> None:
    """Check one ``keep`` before N is known: a fraction in (0, 1] or an int count >= 1."""
    check_keep(keep)
    if isinstance(keep, Integral) and keep < 1:
        raise ValueError(f"keep={keep} tokens: a token method keeps at least 1 (pass an int >= 1 or a fraction)")


def per_image_keep(keep, n_images: int) -> list:
    """``keep`` (one value, or a list/tuple with one per image) -> a list of ``n_images`` values."""
    if isinstance(keep, (list, tuple)):
        if len(keep) != n_images:
            raise ValueError(f"keep has {len(keep)} entries but the batch has {n_images} images")
        return list(keep)
    if isinstance(keep, torch.Tensor):
        raise TypeError("keep must be a float, an int or a list of them per image, not a tensor")
    return [keep] * n_images


# --------------------------------------------------------------------------- scores
def fopru_scores(
    attn: torch.Tensor, *, method: str = "cls", num_prefix: int | None = None, check_finite: bool = True
) -> torch.Tensor:
    """Token significance from vision-encoder attention.

    Args:
        attn: attention probabilities of one encoder layer, one of
            ``(B, heads, N, N)`` — the full map (eager attention output), or
            ``(B, heads, N)`` — only the rows needed: for ``method="cls"`` the CLS query row
            ``A[:, :, 0, :]``; for ``method="colmean"`` the query-mean ``A.mean(2)``
            (what :mod:`tokenprune.fopru.capture` computes without materialising N x N).
        method: ``"cls"`` (paper): ``s_j = mean_h A[h, 0, j]``, needs a CLS token at index 0.
            ``"colmean"`` (reconstruction): attention received, ``s_j = mean_h mean_i A[h, i, j]``;
            the option for CLS-free encoders (SigLIP, Qwen2-VL).
        num_prefix: leading non-patch tokens (CLS, registers) dropped from the output.
            Default: 1 for ``"cls"``, 0 for ``"colmean"``.
        check_finite: raise on NaN/inf (one host synchronisation; False skips it).

    Returns:
        ``(B, N - num_prefix)`` float32 scores of the patch tokens, in input order.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    check_float(attn, "attn", finite=check_finite)
    if num_prefix is None:
        num_prefix = 1 if method == "cls" else 0
    if not isinstance(num_prefix, Integral) or num_prefix < 0:
        raise ValueError(f"num_prefix must be a non-negative int, got {num_prefix!r}")
    if attn.dim() == 4:
        n = attn.shape[-1]
        if method == "cls":
            if attn.shape[2] != n:
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


# --------------------------------------------------------------------------- selection
def _row_grid(grid, n: int) -> tuple[int, int]:
    try:
        h, w = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (H, W) of ints, got {grid!r}") from None
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(f"grid {(h, w)} does not match N={n} tokens (H*W={h * w})")
    return h, w


def fopru_select(
    scores: torch.Tensor,
    keep,
    *,
    strategy: str = "rank",
    grid: tuple[int, int] | None = None,
    row_mode: str = "rows",
    check_finite: bool = True,
) -> torch.Tensor:
    """Choose which patch tokens survive; returns ``(B, K)`` int64 indices sorted ascending.

    Args:
        scores: ``(B, N)`` significance (higher = keep), e.g. from :func:`fopru_scores`.
        keep: fraction in (0, 1] (``K = floor(keep * N + 0.5)``) or int count; exact K always.
        strategy: ``"rank"`` (paper, global view): the K highest-scoring tokens.
            ``"row"`` (paper, local view over the ``grid``); two readings (reconstruction):
            ``row_mode="rows"`` keeps the ``K // W`` whole rows with the largest summed
            score, then the best ``K % W`` tokens of the next-ranked row;
            ``row_mode="per_row"`` keeps the top ``K // H`` tokens in every row and one more
            in each of the ``K % H`` best rows.  Below one row's worth of tokens (``K < W``
            for ``"rows"``, ``K < H`` for ``"per_row"``) it falls back to ``"rank"``.
        grid: ``(H, W)`` patch grid with ``H * W == N`` (raster order); needed by ``"row"``.
        row_mode: see ``strategy``.
        check_finite: raise on NaN/inf scores (one host synchronisation; False skips it).

    Ties are broken toward the lower index, so the result is deterministic. ``"rank"`` runs
    without a host synchronisation; ``"row"`` needs one (``nonzero``).
    """
    check_float(scores, "scores", finite=check_finite)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if row_mode not in ROW_MODES:
        raise ValueError(f"unknown row_mode {row_mode!r}; expected one of {ROW_MODES}")
    b, n = scores.shape
    if n == 0:
        raise ValueError("scores has no tokens (N=0)")
    k = keep_count(n, keep, minimum=1)
    if strategy == "row":
        if grid is None:
            raise ValueError("strategy='row' needs grid=(H, W)")
        h, w = _row_grid(grid, n)
        if (row_mode == "rows" and k < w) or (row_mode == "per_row" and k < h):
            strategy = "rank"
    elif grid is not None:
        _row_grid(grid, n)
    if strategy == "rank":
        return torch_top_k(scores, k)

    g = scores.reshape(b, h, w)
    row_rank = torch_rank(g.sum(dim=-1))  # (B, H)
    if row_mode == "rows":
        full, rem = divmod(k, w)
        mask = (row_rank < full)[:, :, None].expand(b, h, w).clone()
        if rem:
            ar = torch.arange(b, device=scores.device)
            part_row = (row_rank == full).long().argmax(dim=-1)  # (B,) the next-best row
            mask[ar, part_row] = torch_rank(g[ar, part_row]) < rem
    else:  # per_row
        base, rem = divmod(k, h)
        counts = base + (row_rank < rem).long()  # (B, H)
        mask = torch_rank(g) < counts[:, :, None]
    # nonzero() is row-major, hence ascending within each batch row (the reorder step).
    return mask.reshape(b, n).nonzero()[:, 1].view(b, k)


def select_per_image(
    scores: torch.Tensor,
    keeps: Sequence,
    *,
    strategy: str = "rank",
    grid: tuple[int, int] | None = None,
    row_mode: str = "rows",
) -> list[torch.Tensor]:
    """:func:`fopru_select` for ``scores`` ``(n_images, N)`` with one ``keep`` per image.

    Images with the same K are selected in one call (no NaN check: the adapters' own scores).
    Returns ``n_images`` sorted ``(K_i,)``.
    """
    n_images, n = scores.shape
    ks = [keep_count(n, kp, minimum=1) for kp in keeps]
    opts = dict(strategy=strategy, grid=grid, row_mode=row_mode, check_finite=False)
    if len(set(ks)) == 1:
        return list(fopru_select(scores, ks[0], **opts).unbind(0))
    out: list[torch.Tensor] = [scores.new_empty(0, dtype=torch.long)] * n_images
    for k in sorted(set(ks)):
        ids = [i for i, kk in enumerate(ks) if kk == k]
        sel = fopru_select(scores[ids], k, **opts)
        for j, i in enumerate(ids):
            out[i] = sel[j]
    return out
