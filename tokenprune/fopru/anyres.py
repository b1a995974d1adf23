"""Any-res selection (LLaVA-NeXT, LLaVA-OneVision): :class:`AnyResLayout` says where each packed
token comes from (base crop, sub-crop, newline); crop scores are normalised and the budget is
spent over the packed image (:func:`anyres_select`, :func:`packed_select`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunecore.budget import keep_count

from .scoring import check_float, fopru_select

ANYRES_NORMS = ("sum", "max", "none")
NEWLINE_RULES = ("row", "all", "none")

__all__ = [
    "ANYRES_NORMS",
    "NEWLINE_RULES",
    "AnyResLayout",
    "normalise_crop_scores",
    "packed_select",
    "anyres_select",
]


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
