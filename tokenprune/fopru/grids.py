"""Merged-grid mappings: patch scores pooled onto a merger's grid (Qwen-VL 2x2 mergers, Gemma 3),
packed (window-ordered) positions mapped to raster order, and the column-mean attention of a
packed, block-diagonal sequence (:func:`packed_colmean`). Tensors in, tensors out."""

from __future__ import annotations

import torch

from .scoring import check_float

__all__ = [
    "merge_grid_scores",
    "packed_patch_to_raster",
    "merged_scores_from_packed",
    "packed_colmean",
    "window_merged_scores",
]


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
