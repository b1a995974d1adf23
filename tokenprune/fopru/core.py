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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from prunecore.budget import check_keep, keep_count, torch_rank, torch_top_k

__all__ = [
    "ANYRES_NORMS",
    "METHODS",
    "NEWLINE_RULES",
    "ROW_MODES",
    "STRATEGIES",
    "AnyResLayout",
    "anyres_select",
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

METHODS = ("cls", "colmean")
STRATEGIES = ("rank", "row")
ROW_MODES = ("rows", "per_row")
ANYRES_NORMS = ("sum", "max", "none")
NEWLINE_RULES = ("row", "all", "none")


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


# --------------------------------------------------------------------------- merged grids
def merge_grid_scores(scores: torch.Tensor, grid: tuple[int, int], merge: int = 2) -> torch.Tensor:
    """Pool patch scores onto a ``merge x merge`` merged-token grid (Qwen2-VL's 2x2 merger).

    Args:
        scores: ``(B, H*W)`` patch scores in raster order over ``grid=(H, W)``.
        grid: patch grid; both sides divisible by ``merge``.
        merge: spatial merge size.

    Returns:
        ``(B, (H/merge) * (W/merge))`` mean score per merged token, raster order over the
        merged grid.
    """
    check_float(scores, "scores", finite=False)
    h, w = (int(g) for g in grid)
    if scores.dim() != 2 or scores.shape[1] != h * w:
        raise ValueError(f"scores {tuple(scores.shape)} does not match grid {(h, w)}")
    if h % merge or w % merge:
        raise ValueError(f"grid {(h, w)} is not divisible by merge={merge}")
    b = scores.shape[0]
    x = scores.reshape(b, h // merge, merge, w // merge, merge)
    return x.mean(dim=(2, 4)).reshape(b, -1)


def packed_patch_to_raster(grid: tuple[int, int], merge: int = 2, device=None) -> torch.Tensor:
    """Raster index of every packed (block-major) patch of one image frame.

    Qwen-VL processors emit the ``h x w`` patches of a frame window by window: merged token
    ``m = (bh, bw)`` (raster over ``(h/merge, w/merge)``) owns the ``merge**2`` consecutive
    patches ``m*merge**2 + (dy*merge + dx)`` at patch row ``bh*merge + dy``, column
    ``bw*merge + dx``.

    Returns:
        ``(h*w,)`` int64: ``out[j]`` = raster index ``row * w + col`` of packed patch ``j``.
    """
    h, w = (int(g) for g in grid)
    if h < 1 or w < 1 or h % merge or w % merge:
        raise ValueError(f"patch grid {(h, w)} is not divisible by the merge size {merge}")
    raster = torch.arange(h * w, device=device).view(h, w)
    return raster.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).reshape(-1)


def merged_scores_from_packed(scores: torch.Tensor, grid: tuple[int, int], merge: int = 2) -> torch.Tensor:
    """Pool one frame's packed patch scores onto its merged-token grid.

    In the packed order every merged token owns ``merge**2`` consecutive patches, so the
    pooling is a mean over consecutive groups (equal to :func:`merge_grid_scores` of the
    raster-ordered scores).

    Args:
        scores: ``(..., h*w)`` patch scores in the packed (block-major) order of the vision tower.
        grid: ``(h, w)`` patch grid of the frame.
        merge: ``spatial_merge_size``.

    Returns:
        ``(..., (h/merge) * (w/merge))`` mean score of each merged token (raster over the merged grid).
    """
    h, w = (int(g) for g in grid)
    if scores.shape[-1] != h * w:
        raise ValueError(f"scores have {scores.shape[-1]} patches but the grid {(h, w)} has {h * w}")
    if h % merge or w % merge:
        raise ValueError(f"patch grid {(h, w)} is not divisible by the merge size {merge}")
    return scores.reshape(*scores.shape[:-1], -1, merge * merge).mean(-1)


def packed_colmean(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, *, scale: float, max_block_elems: int = 1 << 24
) -> torch.Tensor:
    """Column means of block-diagonal attention over a packed sequence of images.

    Args:
        q, k: ``(heads, N, d)`` queries and keys after the rotary embedding (any float dtype;
            the math runs in float32).
        cu_seqlens: ``(S+1,)`` segment boundaries (CPU or device; read once on the host).
        scale: the attention scale (``d ** -0.5`` for these towers).
        max_block_elems: queries run in blocks of at most ``max_block_elems / (heads * n_s)``
            rows, so memory stays bounded for big images.

    Returns:
        ``(heads, N)`` float32: for a patch ``j`` of segment ``s``, ``mean_{i in s} A_s[h, i, j]``
        with ``A_s = softmax(q_s k_s^T * scale)``. One rule for every runtime that scores a
        packed tower (the transformers hooks and the vLLM plugin).
    """
    heads, n, _ = q.shape
    q = q.float() * scale  # scale the (N, d) queries, not the (N, N) scores
    k = k.float()
    out = torch.zeros(heads, n, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):  # one segment at a time: block-diagonal
        seg = b - a
        if seg == 0:
            continue
        kt = k[:, a:b].transpose(-1, -2)
        blk = max(1, max_block_elems // (heads * seg))
        acc = out[:, a:b]
        for start in range(a, b, blk):
            acc += torch.softmax(q[:, start : min(b, start + blk)] @ kt, dim=-1).sum(dim=1)
        acc /= seg
    return out


def window_merged_scores(patch_scores: torch.Tensor, window_index: torch.Tensor, merge: int) -> torch.Tensor:
    """Merged-token scores of a windowed tower (Qwen2.5-VL) in the merger's output order.

    Args:
        patch_scores: ``(N,)`` per-patch scores in the tower's *window order* (merge units
            permuted by the model's window index, each unit's ``merge**2`` patches consecutive).
        window_index: ``(N / merge**2,)`` the permutation the tower applied to the merge units
            (``window_order[i] = raster_unit[window_index[i]]``).
        merge: ``spatial_merge_size``.

    Returns:
        ``(N / merge**2,)`` mean score of each merged token, raster order over the merged grids.
    """
    in_window_order = patch_scores.reshape(-1, merge * merge).mean(-1)  # per merge unit
    merged = torch.empty_like(in_window_order)
    merged[window_index.to(merged.device)] = in_window_order
    return merged


# --------------------------------------------------------------------------- any-res (LLaVA-NeXT)
@dataclass(frozen=True)
class AnyResLayout:
    """Where every token of one packed any-res image comes from.

    Attributes:
        source: ``(L,)`` int64; for a visual token, its index into the image's crop patches
            flattened as ``(1 + n_crops) * P`` (crop 0 = base view, patch raster order inside a
            crop, ``P = side * side``); ``-1`` for an ``image_newline`` token.
        row: ``(L,)`` int64 row id: ``0 .. side-1`` for the base view's rows,
            ``side + r`` for row ``r`` of the unpadded big grid (its newline included).
        n_crops: high-resolution crops (excluding the base view).
        grid: ``(nph, npw)`` crop grid; ``side``: patches per crop side;
        unpadded: ``(H', W')`` big-grid patch shape after unpadding.
    """

    source: torch.Tensor
    row: torch.Tensor
    n_crops: int
    grid: tuple[int, int]
    side: int
    unpadded: tuple[int, int]

    @property
    def is_newline(self) -> torch.Tensor:
        return self.source < 0

    @property
    def n_visual(self) -> int:
        return int((self.source >= 0).sum())

    def __len__(self) -> int:
        return int(self.source.numel())


def _normalise(crop_scores: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none":
        return crop_scores
    den = crop_scores.sum(dim=1, keepdim=True) if how == "sum" else crop_scores.amax(dim=1, keepdim=True)
    return crop_scores / den.clamp_min(torch.finfo(crop_scores.dtype).tiny)


def normalise_crop_scores(crop_scores: torch.Tensor, how: str) -> torch.Tensor:
    """Per-crop normalisation of ``(n_crops, P)`` scores: ``"sum"`` (each crop sums to 1),
    ``"max"`` (divided by the crop's maximum) or ``"none"``."""
    if how not in ANYRES_NORMS:
        raise ValueError(f"unknown anyres_norm {how!r}; expected one of {ANYRES_NORMS}")
    return _normalise(crop_scores, how)


def packed_select(
    token_scores: torch.Tensor, is_newline: torch.Tensor, row: torch.Tensor, keep, *, newline: str = "row"
) -> torch.Tensor:
    """Positions to keep in one packed image: the K best visual tokens, then its newline tokens.

    Args:
        token_scores: ``(L,)`` score of every packed token (newline entries are ignored).
        is_newline: ``(L,)`` bool, True for ``image_newline`` tokens.
        row: ``(L,)`` int64 row id of every token (a newline has the id of the row it closes).
        keep: fraction in (0, 1] of the visual tokens or an int count (newlines not counted).
        newline: ``"row"`` keeps a row's newline iff a visual token of that row is kept,
            ``"all"`` keeps every newline, ``"none"`` drops them.

    Returns:
        ``(K + kept newlines,)`` int64 positions in ``[0, L)``, ascending (packed order).
    """
    if newline not in NEWLINE_RULES:
        raise ValueError(f"unknown newline rule {newline!r}; expected one of {NEWLINE_RULES}")
    vis_pos = (~is_newline).nonzero().squeeze(1)  # packed positions of visual tokens, ascending
    k = keep_count(int(vis_pos.numel()), keep, minimum=1)
    sel = fopru_select(token_scores[vis_pos][None].float(), k, check_finite=False)[0]
    keep_mask = torch.zeros_like(is_newline)
    keep_mask[vis_pos[sel]] = True
    if newline == "all":
        keep_mask |= is_newline
    elif newline == "row":
        rows_hit = torch.zeros(int(row.max()) + 1, dtype=torch.bool, device=row.device)
        rows_hit[row[keep_mask]] = True
        keep_mask |= is_newline & rows_hit[row]
    return keep_mask.nonzero().squeeze(1)


def anyres_select(
    crop_scores: torch.Tensor,
    layout: AnyResLayout,
    keep,
    *,
    anyres_norm: str = "sum",
    newline: str = "row",
) -> torch.Tensor:
    """Packed positions to keep for one any-res image (FoPru ``rank`` over base + crops).

    Selection policy (reconstruction; the paper covers fixed-size LLaVA-1.5 only): ``keep``
    counts the image's visual tokens (newlines excluded); every crop's scores are first
    normalised (``anyres_norm``, :func:`normalise_crop_scores`), then base and crop patches are
    ranked together; ``newline`` as in :func:`packed_select`.

    Args:
        crop_scores: ``(1 + n_crops, P)`` FoPru patch scores per crop (row 0 = base view).
        layout: the image's :class:`AnyResLayout`.
        keep: fraction in (0, 1] of the visual tokens or an int count.

    Returns:
        ``(K + kept newlines,)`` int64 positions in ``[0, L)``, ascending (packed order).
    """
    if anyres_norm not in ANYRES_NORMS:
        raise ValueError(f"unknown anyres_norm {anyres_norm!r}; expected one of {ANYRES_NORMS}")
    if newline not in NEWLINE_RULES:
        raise ValueError(f"unknown newline rule {newline!r}; expected one of {NEWLINE_RULES}")
    p = layout.side * layout.side
    if not isinstance(crop_scores, torch.Tensor) or crop_scores.shape != (layout.n_crops + 1, p):
        shape = tuple(crop_scores.shape) if isinstance(crop_scores, torch.Tensor) else type(crop_scores).__name__
        raise ValueError(f"crop_scores must be ({layout.n_crops + 1}, {p}) for this layout, got {shape}")
    check_float(crop_scores, "crop_scores")
    src = layout.source.to(crop_scores.device)
    flat = _normalise(crop_scores.float(), anyres_norm).reshape(-1)
    return packed_select(flat[src.clamp_min(0)], src < 0, layout.row.to(src.device), keep, newline=newline)


# --------------------------------------------------------------------------- prompt compaction
def _flat_kept(kept: Sequence[torch.Tensor], tokens_per_image: Sequence[int], device) -> torch.Tensor:
    """Kept positions of all images as indices into the concatenated image tokens."""
    sizes = {int(k.numel()) for k in kept}
    if len(set(tokens_per_image)) == 1 and len(sizes) == 1:  # the common case: one kernel, no Python loop
        n = int(tokens_per_image[0])
        stacked = torch.stack([k.to(device) for k in kept])
        return (stacked + torch.arange(0, n * len(kept), n, device=device)[:, None]).reshape(-1)
    offsets = [0]
    for n in tokens_per_image[:-1]:
        offsets.append(offsets[-1] + int(n))
    return torch.cat([k.to(device) + off for k, off in zip(kept, offsets)])


def image_keep_mask(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: Sequence[int], kept: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``(B, L)`` bool: True for text tokens and for the kept positions of every image's run.

    Args:
        input_ids: ``(B, L)``; image placeholders appear, in order, as one run per image
            (images numbered row-major over the batch, the order of ``masked_scatter``).
        image_token_id: the placeholder id.
        tokens_per_image: ``N_i`` placeholders per image (their sum must be the number of
            placeholders: :func:`shrink_prompt` checks it).
        kept: per image, sorted positions in ``[0, N_i)``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    total = int(sum(int(n) for n in tokens_per_image))
    is_img = input_ids == image_token_id
    img_keep = torch.zeros(total, dtype=torch.bool, device=input_ids.device)
    img_keep[_flat_kept(kept, tokens_per_image, input_ids.device)] = True
    ordinal = (is_img.reshape(-1).long().cumsum(0) - 1).clamp(0, max(total - 1, 0))  # rank among placeholders
    return ~is_img | img_keep[ordinal].view_as(is_img)


def _compact(
    keep: torch.Tensor, attention_mask: torch.Tensor, tensors, lengths: torch.Tensor, new_len: int, left: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    b, L = keep.shape
    col = keep.long().cumsum(1) - 1
    if left:
        col = col + (new_len - lengths)[:, None]
    rows = torch.arange(b, device=keep.device)[:, None].expand(b, L)
    r, c = rows[keep], col[keep]
    new_mask = torch.zeros((b, new_len), dtype=attention_mask.dtype, device=attention_mask.device)
    new_mask[r, c] = attention_mask[keep]
    outs = []
    for x, pad in tensors:
        y = torch.full((*x.shape[:-2], b, new_len), pad, dtype=x.dtype, device=x.device)
        y[..., r, c] = x[..., keep]
        outs.append(y)
    return new_mask, outs


def _padding_side(padding_side: str | None, right_padded: bool) -> bool:
    """True for left padding."""
    if padding_side is None:
        return not right_padded
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return padding_side == "left"


def compact_tokens(
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
    tensors: Sequence[tuple[torch.Tensor, int]],
    *,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Drop the columns ``~keep`` of every row and re-pad rows to the longest one.

    Args:
        keep: ``(B, L)`` bool, columns to keep.
        attention_mask: ``(B, L)``.
        tensors: ``(x, pad_value)`` pairs, ``x`` of shape ``(..., B, L)`` (input ids, labels,
            ``(3, B, L)`` M-RoPE position ids, ...) compacted the same way.
        padding_side: ``"left"``/``"right"``; None = the side the input was padded on (right
            only if some row ends with a masked position; left otherwise, which is what
            decoder-only generation needs).

    Returns:
        ``(new_attention_mask (B, L'), [new x (..., B, L') per input])``.
    """
    lengths = keep.sum(1)
    host = torch.cat([lengths.max().view(1), (attention_mask[:, -1] == 0).any().view(1).long()]).tolist()
    return _compact(keep, attention_mask, tensors, lengths, host[0], _padding_side(padding_side, bool(host[1])))


def shrink_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    tokens_per_image: Sequence[int],
    kept: Sequence[torch.Tensor],
    tensors: Sequence[tuple[torch.Tensor, int]],
    *,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[int], list[int]]:
    """Shrink every image's placeholder run to its kept positions, drop padding and re-pad to
    the shortest width, with ONE host synchronisation (the new width is a shape).

    Args:
        input_ids, attention_mask: ``(B, L)``.
        image_token_id, tokens_per_image, kept: as in :func:`image_keep_mask`.
        tensors: ``(x, pad_value)`` pairs ``(..., B, L)`` to shrink alike (``input_ids`` itself
            must be one of them if the shrunk ids are wanted).
        padding_side: as in :func:`compact_tokens`.

    Returns:
        ``(new_attention_mask (B, L'), [shrunk tensors], attended tokens per row before, after)``.
    """
    keep = image_keep_mask(input_ids, image_token_id, tokens_per_image, kept) & attention_mask.bool()
    lengths = keep.sum(1)
    right = (attention_mask[:, -1] == 0).any().view(1).long()
    n_img = (input_ids == image_token_id).sum().view(1)
    host = torch.cat([n_img, right, attention_mask.sum(1).long(), lengths]).tolist()
    b = input_ids.shape[0]
    total = int(sum(int(n) for n in tokens_per_image))
    if host[0] != total:
        raise ValueError(f"input_ids hold {host[0]} image tokens but the images have {total} features")
    tokens_in, tokens_out = host[2 : 2 + b], host[2 + b :]
    left = _padding_side(padding_side, bool(host[1]))
    new_mask, outs = _compact(keep, attention_mask, tensors, lengths, max(tokens_out), left)
    return new_mask, outs, tokens_in, tokens_out


def prune_mm_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    tokens_per_image: Sequence[int],
    kept: Sequence[torch.Tensor],
    *,
    pad_token_id: int = 0,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink each image's placeholder run to its kept tokens: ``(input_ids, attention_mask)``
    ``(B, L')``, padding rebuilt to the shortest width (see :func:`shrink_prompt`)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    new_mask, (new_ids,), _, _ = shrink_prompt(
        input_ids,
        attention_mask,
        image_token_id,
        tokens_per_image,
        kept,
        [(input_ids, pad_token_id)],
        padding_side=padding_side,
    )
    return new_ids, new_mask
